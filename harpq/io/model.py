"""Loading Hugging Face causal LMs and finding their decoder layers, generically.

Llama, Mistral and Qwen2/3 share one shape: `model.layers` is a ModuleList of identical decoder
layers whose linears are the weights to quantize. Nothing here imports a model-specific class.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import HarpqError
from ..nn import QuantLinear

LINEAR_TYPES = (nn.Linear, QuantLinear)
#: what a Hugging Face hub id looks like (`org/name` or `name`), as opposed to a local path
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def read_config(path: str | Path) -> dict:
    """config.json of a model directory, with clear errors for anything that is not one."""
    p = Path(path)
    if not p.exists():
        if HUB_ID.fullmatch(str(path)) and not str(path).startswith(("/", ".", "~")):
            raise HarpqError(f"model {path} not found locally (no hub access: harpq loads local directories only; "
                             "download the model and pass its folder)")
        raise HarpqError(f"model path not found: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise HarpqError(f"not a model directory (no config.json): {p}")
    try:
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HarpqError(f"{p / 'config.json'} is not valid JSON: {e.msg} at line {e.lineno}") from None
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise HarpqError(
            f"unsupported architecture {', '.join(archs) or config.get('model_type', '?')} in {p}: "
            "harpq quantizes decoder-only *ForCausalLM models"
        )
    if not list(p.glob("*.safetensors")):
        raise HarpqError(f"no *.safetensors weights in {p} (harpq loads only safetensors, never pickle)")
    return config


def load_model(path: str | Path, dtype: torch.dtype | str = "auto", device: str = "cpu") -> nn.Module:
    """A *ForCausalLM from a local directory: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    read_config(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, device_map=device if device != "cpu" else None,
            use_safetensors=True, trust_remote_code=False, local_files_only=True, output_loading_info=True,
        )
    except HarpqError:
        raise
    except Exception as e:  # any failure inside transformers/safetensors is a bad checkpoint to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarpqError(f"cannot load {path}: {first}") from None
    for kind, what in (("missing_keys", "missing from"), ("mismatched_keys", "of the wrong shape in"),
                       ("unexpected_keys", "not part of the architecture, found in")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise HarpqError(f"{keys[0]}{more} {what} the checkpoint {path} (config.json and weights disagree)")
    model.eval()
    find_decoder_layers(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta":
            check_finite(name, t)
    return model


#: families whose decoder layers the engine runs exactly (attention with optional q/k biases, q/k norms and
#: sliding windows; SiLU-gated MLP or a mixture of such experts; RMSNorm); anything else it refuses
ENGINE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
#: rotary scalings that are a fixed function of position (what HF's rotary module precomputes)
STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")


def attention_windows(config) -> list[int | None]:
    """The sliding window of each decoder layer (None: full causal attention), as the model applies it."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * layers
    return [window] * layers


def engine_unsupported(config) -> str | None:
    """Why harpq's decoder cannot run this model exactly (family and feature), or None."""
    family = getattr(config, "model_type", "?")
    if family not in ENGINE_FAMILIES:
        return f"the decode engine runs {', '.join(ENGINE_FAMILIES)} models, not {family}"
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"{family} with {act} MLPs (the engine runs SiLU)"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in STATIC_ROPE:
        return f"{family} with {kind} rotary scaling (the engine takes scalings fixed per position)"
    return None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (ValueError, OSError) as e:
        raise HarpqError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, layers): the longest ModuleList of same-class blocks that contain linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise HarpqError(f"unsupported architecture {type(model).__name__}: no list of decoder layers found")
    return best


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear sublayers of a decoder layer, by relative name, in execution-like order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


#: linears that read the input of another, by name (q/k/v read q's, up reads gate's): where no calibration
#: pass shows which linears read one tensor, these names group them
SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def input_group(rel: str, linears: dict) -> str:
    """The linear of a layer whose input `rel` reads (itself unless a sibling named as in SAME_INPUT_AS
    exists): the group the layer-wise path's Hessian hooks find, and the name its input seed derives from."""
    parent, dot, leaf = rel.rpartition(".")
    leader = f"{parent}{dot}{SAME_INPUT_AS[leaf]}" if leaf in SAME_INPUT_AS else rel
    return leader if leader in linears else rel


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise HarpqError(f"{name} has {bad} NaN/Inf values: the checkpoint is damaged")
