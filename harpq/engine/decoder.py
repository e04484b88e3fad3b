"""A Llama-family decoder for inference: static KV cache, one forward for prefill and decode.

Owning the step (instead of calling Hugging Face `generate`) is what lets a whole token be captured in
one CUDA graph: every tensor it touches is allocated once, positions live on the device, and nothing
syncs with the host. Its linears are any modules (nn.Linear or QuantLinear); plain fp16 q/k/v and
gate/up linears are concatenated into one matrix each, as fast engines do, and so are quantized ones whose
storage format can hold them as one matrix (no processor, per-group scales).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import HarpqError
from ..io.model import attention_windows, engine_unsupported
from ..kernels.fused import rms_norm, rope_into_cache, silu_mul
from ..nn import QuantLinear, SharedInput
from .fused_sides import ATTN, MLP, LayerSides


@dataclass(frozen=True)
class DecoderShape:
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear of one layer."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (q, self.dim), "k_proj": (kv, self.dim), "v_proj": (kv, self.dim),
                "o_proj": (self.dim, q), "gate_proj": (self.ffn, self.dim), "up_proj": (self.ffn, self.dim),
                "down_proj": (self.dim, self.ffn)}


SHAPES = {
    "llama-2-7b": DecoderShape(4096, 32, 32, 32, 11008, 32000),
    "llama-3-8b": DecoderShape(4096, 32, 32, 8, 14336, 128256, rope_theta=500000.0),
    "llama-2-70b": DecoderShape(8192, 80, 64, 8, 28672, 32000),
}


def _fusable(mods: list[nn.Module]) -> bool:
    return all(type(m) is nn.Linear for m in mods) and len({m.weight.dtype for m in mods}) == 1


def _stack(mods: list[nn.Module]) -> nn.Module | None:
    """One module for linears that read the same input: fp16 weights concatenated, quantized matrices
    stacked where their format allows (`QuantLinear.stack`), or else quantized linears with one input
    transform applied once (`SharedInput`, whose output is a list); None otherwise."""
    if _fusable(mods):
        return _concat(mods)
    if all(isinstance(m, QuantLinear) for m in mods):
        return QuantLinear.stack(mods) or SharedInput.build(mods)
    return None


def _outputs(out: torch.Tensor | list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """A stacked module's output split into its members' (a SharedInput gives them already apart)."""
    return list(out) if isinstance(out, list) else list(out.split(sizes, dim=-1))


def _concat(mods: list[nn.Module]) -> nn.Linear:
    """One linear over the stacked weights; the originals become views of it (no second copy in memory)."""
    weight = torch.cat([m.weight.data for m in mods])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=mods[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight.data = weight
    if fused.bias is not None:
        fused.bias.data = torch.cat([m.bias.data for m in mods])
    start = 0
    for m in mods:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if m.bias is not None:
            m.bias.data = fused.bias.data[start:start + rows]
        start += rows
    return fused


class Block(nn.Module):
    """One decoder layer: attention (optional q/k RMSNorms per head, optional sliding `window`) and the SiLU MLP."""

    def __init__(self, shape: DecoderShape, linears: dict[str, nn.Module], attn_norm: torch.Tensor,
                 mlp_norm: torch.Tensor, window: int | None = None,
                 qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None, moe: nn.Module | None = None):
        super().__init__()
        self.shape = shape
        self.window = window
        self.q_norm, self.k_norm = qk_norm if qk_norm is not None else (None, None)
        self.moe = moe  # a mixture-of-experts block (router + experts), run as the model defines it
        qkv = [linears[k] for k in ATTN[:3]]
        gate_up = [linears["gate_proj"], linears["up_proj"]] if moe is None else None
        self.qkv = _stack(qkv)
        self.gate_up = _stack(gate_up) if gate_up else None
        self.linears = nn.ModuleDict({k: v for k, v in linears.items()
                                      if not (self.qkv is not None and k in ATTN[:3])
                                      and not (self.gate_up is not None and k in MLP[:2])})
        #: block-Hadamard sides applied inside the step's own kernels (None: each linear applies its own)
        self.fused_sides = LayerSides.build(linears, shape.hd) if moe is None and qk_norm is None else None
        self.register_buffer("attn_norm", attn_norm)
        self.register_buffer("mlp_norm", mlp_norm)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.fused_sides is not None:  # its stacked matrices are plain tensors: move them along
            self.fused_sides.apply_(fn)
        return self

    def forward(self, x, pos, cos, sin, masks: dict, fused: bool):
        s, (b, t, _) = self.shape, x.shape
        mask = masks[self.window]
        if fused and self.fused_sides is not None and x.dtype == torch.float16:
            return self.fused_sides.forward(self, x, pos, cos, sin, mask)
        h = rms_norm(x, self.attn_norm, s.norm_eps, fused)
        if self.qkv is not None:
            q, k, v = _outputs(self.qkv(h), [s.heads * s.hd, s.kv_heads * s.hd, s.kv_heads * s.hd])
        else:
            q, k, v = (self.linears[n](h) for n in ATTN[:3])
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's q and k, before the rotary embedding
            q = rms_norm(q.reshape(b, t, s.heads, s.hd), self.q_norm, s.norm_eps, False).view(b, t, -1)
            k = rms_norm(k.reshape(b, t, s.kv_heads, s.hd), self.k_norm, s.norm_eps, False).view(b, t, -1)
        if fused and s.hd & (s.hd - 1) == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
            q = rope_into_cache(q, k, v, cos, sin, pos, self.k_cache, self.v_cache)
        else:
            q = _rope(q.view(b, t, s.heads, s.hd), cos, sin).transpose(1, 2)
            k = _rope(k.view(b, t, s.kv_heads, s.hd), cos, sin).transpose(1, 2)
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v.view(b, t, s.kv_heads, s.hd).transpose(1, 2))
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                           enable_gqa=s.heads != s.kv_heads)
        x = _add_linear(x, self.linears["o_proj"], o.transpose(1, 2).reshape(b, t, s.heads * s.hd))
        if FOLD and isinstance(self.gate_up, QuantLinear):  # the norm and SiLU·up in its kernel where it can
            return _add_linear(x, self.linears["down_proj"], self.gate_up.glu(x, norm=(self.mlp_norm, s.norm_eps)))
        h = rms_norm(x, self.mlp_norm, s.norm_eps, fused)
        if self.moe is not None:
            return x + self.moe(h)
        if self.gate_up is not None:
            gate, up = _outputs(self.gate_up(h), [s.ffn, s.ffn])
        else:
            gate, up = self.linears["gate_proj"](h), self.linears["up_proj"](h)
        return _add_linear(x, self.linears["down_proj"], silu_mul(gate, up, fused))


#: fold the MLP's input RMSNorm and its SiLU·up into the quantized gate/up GEMV where its kernel can
#: (`QuantLinear.glu`): up to two launches less per layer. HARPQ_FOLD=0 (or setting this) turns it off, for
#: comparisons. (Folding the attention's norm into q/k/v measured slower on the H200: not done.)
FOLD = os.environ.get("HARPQ_FOLD", "1") != "0"


def _add_linear(residual: torch.Tensor, linear: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """residual + linear(h): fused into a quantized linear's kernel (one launch less per add)."""
    if isinstance(linear, QuantLinear):
        return linear(h, residual=residual)
    return residual + linear(h)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half convention); cos, sin (T, head_dim) float32, applied in x's
    dtype as Hugging Face does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)


class Decoder(nn.Module):
    """tokens (B, T) at positions pos (T,) -> logits of the last position (B, V); the cache is updated."""

    def __init__(self, shape: DecoderShape, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: nn.Module, inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0):
        super().__init__()
        self.shape = shape
        self.register_buffer("embed", embed)
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("norm", norm)
        self.lm_head = lm_head
        if inv_freq is None:
            hd = shape.hd
            inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self.register_buffer("inv_freq", inv_freq.float().to(embed.device))
        self.rope_scale = rope_scale
        self.max_len = 0

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def graphable(self) -> bool:
        """Whether a step can be captured in a CUDA graph (expert routing is data-dependent: it cannot)."""
        return all(blk.moe is None for blk in self.blocks)

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate (or re-zero) the static KV cache for `batch` sequences of up to `max_len` tokens."""
        s, dtype = self.shape, self.embed.dtype
        for blk in self.blocks:
            blk.k_cache = torch.zeros(batch, s.kv_heads, max_len, s.hd, dtype=dtype, device=self.device)
            blk.v_cache = torch.zeros_like(blk.k_cache)
        pos = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        self.positions = torch.arange(max_len, device=self.device)
        self.max_len = max_len

    def cache_bytes(self) -> int:
        return sum(2 * b.k_cache.numel() * b.k_cache.element_size() for b in self.blocks)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.max_len == 0:
            raise HarpqError("call setup_cache(batch, max_len) before running the decoder")
        fused = self.device.type == "cuda" and kernels.triton_available(tokens)
        x = self.embed[tokens]
        cos, sin = self.cos[pos], self.sin[pos]
        causal = self.positions[None, :] <= pos[:, None]
        masks = {w: _additive(causal if w is None else causal & (self.positions[None, :] > pos[:, None] - w), x.dtype)
                 for w in {blk.window for blk in self.blocks}}  # per sliding window: key > query − window
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, masks, fused)
        x = rms_norm(x[:, -1], self.norm, self.shape.norm_eps, fused)
        return self.lm_head(x)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (T, S) attention mask as the (1, 1, T, S) additive mask attention kernels take (0 or −inf) in
    the activations' dtype, its rows 16 elements apart: made once per step, because a boolean mask, or one
    of another dtype or an unaligned row stride, is converted (or padded) again by every layer's attention."""
    t, s = allowed.shape
    out = torch.empty(t, -(-s // 16) * 16, dtype=dtype, device=allowed.device)[:, :s]
    out.zero_().masked_fill_(~allowed, float("-inf"))
    return out[None, None]


def from_hf(model: nn.Module) -> Decoder:
    """Wrap a loaded Hugging Face model of a family the engine runs exactly (`io.model.ENGINE_FAMILIES`: fp or
    harpq-quantized) without copying its weights; refuse any other in one line naming family and feature."""
    cfg = model.config
    why = engine_unsupported(cfg)
    if why:
        raise HarpqError(why)
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise HarpqError(f"{type(model).__name__} is not a decoder with model.layers and model.embed_tokens")
    heads = cfg.num_attention_heads
    shape = DecoderShape(cfg.hidden_size, cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", heads),
                         cfg.intermediate_size, cfg.vocab_size, norm_eps=cfg.rms_norm_eps,
                         head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    blocks = []
    for layer, window in zip(inner.layers, attention_windows(cfg), strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        moe = mlp if hasattr(mlp, "experts") else None
        linears = {n: getattr(attn, n) for n in ATTN} | ({n: getattr(mlp, n) for n in MLP} if moe is None else {})
        norms = layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data
        qk = (attn.q_norm.weight.data, attn.k_norm.weight.data) if hasattr(attn, "q_norm") else None
        blocks.append(Block(shape, linears, *norms, window=window, qk_norm=qk, moe=moe))
    rotary = inner.rotary_emb
    return Decoder(shape, inner.embed_tokens.weight.data, blocks, inner.norm.weight.data, model.lm_head,
                   inv_freq=rotary.inv_freq, rope_scale=float(getattr(rotary, "attention_scaling", 1.0)))
