"""Exporting harpq checkpoints to the formats serving stacks read: compressed-tensors and GPTQ.

Only what the target expresses exactly is exported: integer-zero scalar grids (rtn, gptq) at 4 or 8 bits,
per group (whole groups) or per row, without a processor. Codes and integer zero-points move bit for bit;
scales are stored in the model's dtype by compressed-tensors (fp16 → bf16 rounds: the export says by how
much) and in fp16 by GPTQ. Anything else is refused in one line that says why and what would work.

compressed-tensors "pack-quantized" (its own packing, read from its specification): per row, 32
consecutive codes of b bits form exactly b int32 words, code i at bit i·b, the row cut to ⌈n·b/32⌉ words
(harpq's packing, truncated); zero-points packed the same way down each group's column; codes and zeros
are the signed values offset by 2^(b−1), so an unsigned harpq code q and zero z are stored as they are.

GPTQ (AutoGPTQ's "gptq" checkpoint format, which GPTQModel and vLLM read): qweight (n·b/32, m) packs 32/b
input rows per word, lowest bits first; qzeros (groups, m·b/32) packs output columns the same way and
stores z − 1 (so a zero-point of 0 cannot be stored: refused); scales (groups, m) fp16; g_idx (n,) the
group of each input column.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..codebooks import saved_codebook
from ..errors import HarpqError
from ..formats.packing import unpack_bits
from .checkpoint import AUX_FILES, ShardWriter, staging_dir, verify_manifest
from .hf_integration import QUANT_METHOD

log = logging.getLogger(__name__)
FORMATS = ("compressed-tensors", "gptq")
EXPORT_BITS = (4, 8)


def _why_not(name: str, spec: dict[str, Any], fmt: str) -> str | None:
    """Why module `name` cannot be written in `fmt` exactly, or None."""
    cb, proc = spec.get("codebook", {}), spec.get("processor", {})
    if spec.get("kind") == "experts":
        return f"{name} holds mixture-of-experts weights, which harpq exports to neither format yet"
    if cb.get("name") != "scalar":
        return f"{name} uses the {cb.get('name')} codebook, which {fmt} cannot express (it stores integer grids)"
    if cb.get("scale") != "minmax":
        what = {"hqq": "fractional fp16 zero-points (hqq)", "rms": "one scale per matrix on ±2.4·RMS (quip)"}
        return f"{name} has {what.get(cb.get('scale'), cb.get('scale'))}, which {fmt} cannot express"
    if proc.get("name") != "none":
        return (f"{name} has a {proc.get('name')} processor: its rotations have no exact counterpart in {fmt} "
                "(export a model quantized without one)")
    if cb.get("bits") not in EXPORT_BITS:
        return f"{name} has {cb.get('bits')}-bit codes; vLLM serves {fmt} integer weights at 4 or 8 bits"
    g = cb.get("group_size") or 0
    if g and spec["in_features"] % g:
        return (f"{name} has a shorter last group ({g} does not divide {spec['in_features']}), which {fmt} cannot "
                "express: quantize with a group size that divides every width (--no-ragged-groups checks that)")
    return None


def _modules(config: dict[str, Any], path: Path, fmt: str) -> dict[str, dict[str, Any]]:
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise HarpqError(f"{path} is not a harpq-quantized model (quant_method {qc.get('quant_method')!r})")
    modules = qc.get("modules") or {}
    for name, spec in modules.items():
        why = _why_not(name, spec, fmt)
        if why:
            raise HarpqError(f"cannot export to {fmt}: {why}; quantize with --method rtn or gptq, --bits 4 or 8, "
                             "a group size that divides every width (or 0)")
    return modules


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of each row: b words per 32 codes, cut to ⌈n·b/32⌉ words."""
    from ..formats.packing import pack_bits

    n = codes.shape[-1]
    return pack_bits(codes, bits)[..., : -(-n * bits // 32)].contiguous()


def _pack_gptq(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ packing along dim 0: word i holds rows (32/b)·i + k at bits b·k."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per, per, *values.shape[1:])
    word = torch.zeros(v.shape[0], *values.shape[1:], dtype=torch.int64)
    for k in range(per):
        word |= v[:, k] << (bits * k)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _module_tensors(name: str, spec: dict[str, Any], t: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """The target tensors of one quantized linear, and the largest relative change of a scale."""
    m, n = spec["out_features"], spec["in_features"]
    cb = spec["codebook"]
    bits, g = cb["bits"], cb["group_size"] or n
    groups = n // g
    codes = unpack_bits(saved_codebook(cb).storage.codes_by_row(t[f"{name}.codes"]), bits, n)
    zeros = unpack_bits(t[f"{name}.zeros"].view(1, -1), bits, m * groups).view(m, groups)
    scales = t[f"{name}.scales"]
    out: dict[str, torch.Tensor] = {}
    if f"{name}.bias" in t:
        out[f"{name}.bias"] = t[f"{name}.bias"]
    if fmt == "compressed-tensors":
        stored = scales.to(dtype)
        change = float(((stored.float() - scales.float()).abs() / scales.float().abs().clamp(min=1e-30)).max())
        out.update({f"{name}.weight_packed": _pack_rows(codes, bits), f"{name}.weight_scale": stored,
                    f"{name}.weight_zero_point": _pack_rows(zeros.T.contiguous(), bits).T.contiguous(),
                    f"{name}.weight_shape": torch.tensor([m, n])})
        return out, change
    if n % (32 // bits) or m % (32 // bits):
        raise HarpqError(f"cannot export to gptq: {name} is {m}×{n}; GPTQ packs {32 // bits} rows or columns "
                         "per word")
    if bool((zeros == 0).any()):
        raise HarpqError(f"cannot export to gptq: {name} has zero-points of 0, which GPTQ's layout (it stores "
                         "z − 1) cannot hold; export to compressed-tensors instead")
    out.update({f"{name}.qweight": _pack_gptq(codes.T.contiguous(), bits),
                f"{name}.qzeros": _pack_gptq((zeros - 1) & ((1 << bits) - 1), bits).T.contiguous(),
                f"{name}.scales": scales.T.contiguous().half(),
                f"{name}.g_idx": (torch.arange(n) // g).to(torch.int32)})
    return out, 0.0


def _quantization_config(modules: dict[str, dict[str, Any]], all_linears: list[str], fmt: str) -> dict[str, Any]:
    ignore = sorted(set(all_linears) - set(modules))
    if fmt == "gptq":
        kinds = {(s["codebook"]["bits"], s["codebook"]["group_size"] or -1) for s in modules.values()}
        if len(kinds) > 1:
            raise HarpqError(f"cannot export to gptq: one bit width and group size for all modules, not {kinds}")
        bits, group = kinds.pop()
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": False,
                "checkpoint_format": "gptq", "true_sequential": True, "modules_in_block_to_quantize": None,
                **({"modules_to_not_convert": ignore} if ignore else {})}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, s in modules.items():
        groups.setdefault((s["codebook"]["bits"], s["codebook"]["group_size"] or 0), []).append(name)
    config_groups = {}
    for i, ((bits, g), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names), "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False,
                        "strategy": "group" if g else "channel", "group_size": g or None, "actorder": None,
                        "observer": "minmax", "observer_kwargs": {}, "block_structure": None}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def export(model: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Write the harpq checkpoint `model` as a `fmt` model directory `out`; returns `out`."""
    from .model import read_config

    if fmt not in FORMATS:
        raise HarpqError(f"unknown export format {fmt!r} (offered: {', '.join(FORMATS)})")
    path = Path(model)
    config = read_config(path)
    modules = _modules(config, path, fmt)
    verify_manifest(path)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float16"), torch.float16)
    target_config = _quantization_config(modules, _linear_names(path, config), fmt)  # refusals first
    tensors = _tensors(path)
    with staging_dir(out, overwrite, [path]) as tmp:
        writer = ShardWriter(tmp)
        done = set()
        worst = 0.0
        for name, spec in modules.items():
            converted, change = _module_tensors(name, spec, tensors, fmt, dtype)
            worst = max(worst, change)
            for key, value in converted.items():
                writer.add(key, value)
            done.update(k for k in tensors if k.startswith(f"{name}."))
        for key, value in tensors.items():
            if key not in done:
                writer.add(key, value)
        writer.close()
        target = {k: v for k, v in config.items() if k != "quantization_config"}
        target["quantization_config"] = target_config
        (tmp / "config.json").write_text(json.dumps(target, indent=2, sort_keys=True) + "\n")
        for name in AUX_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, tmp / name)
    if worst:
        log.warning("scales stored in %s as compressed-tensors keeps them: largest relative change %.2e", dtype,
                    worst)
    return Path(out)


def _linear_names(path: Path, config: dict[str, Any]) -> list[str]:
    """Every nn.Linear of the architecture (built on the meta device), for the target's ignore list."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
