"""`harpq bench`: decode speed of real model shapes with random weights, FP16 against each format.

Weights are random but valid (any E8P code or packed word is a legal code; processor parameters are
each format's own), so the kernels do exactly the work of a real checkpoint. Every number of one run
shares the machine state: the device copy bandwidth is measured in the same run, and the achieved
bandwidth is the bytes a decode step must read (weights, processor tables, the KV cache it attends
over) times steps per second.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..codebooks import make_codebook
from ..errors import HarpqError
from ..io.model import SAME_INPUT_AS, input_group
from ..nn import QuantLinear
from ..processors import make_processor
from ..recipe import Recipe, derive_seed
from .decoder import SHAPES, Block, Decoder, DecoderShape
from .runner import DecodeRunner

#: format name -> (method, recipe settings)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "rtn4": ("rtn", {"bits": 4, "group_size": 128}),
    "rtn2": ("rtn", {"bits": 2, "group_size": 128}),
    "hqq4": ("hqq", {"bits": 4, "group_size": 64}),
    "hqq2": ("hqq", {"bits": 2, "group_size": 64}),
    "quipsharp2": ("quipsharp", {"bits": 2}),
    "quipsharp3": ("quipsharp", {"bits": 3}),
    "quipsharp4": ("quipsharp", {"bits": 4}),
    "quipsharp2-block": ("quipsharp", {"bits": 2, "processor": "rht-block"}),
    "quipsharp3-block": ("quipsharp", {"bits": 3, "processor": "rht-block"}),
    "quipsharp4-block": ("quipsharp", {"bits": 4, "processor": "rht-block"}),
    "harp2": ("harp", {"bits": 2, "harp_schedule": "kron"}),
    "harp3": ("harp", {"bits": 3, "harp_schedule": "kron"}),
    "harp4": ("harp", {"bits": 4, "harp_schedule": "kron"}),
    "harp2-block": ("harp", {"bits": 2, "harp_schedule": "block"}),
    "harp3-block": ("harp", {"bits": 3, "harp_schedule": "block"}),
    "harp4-block": ("harp", {"bits": 4, "harp_schedule": "block"}),
    "qtip2": ("qtip", {"bits": 2}),
    "qtip3": ("qtip", {"bits": 3}),
    "qtip4": ("qtip", {"bits": 4}),
    "harp-qtip2": ("harp", {"bits": 2, "codebook": "qtip", "harp_schedule": "kron"}),
}


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(t.dtype)
        return torch.randint(info.min, info.max + 1, t.shape, dtype=t.dtype, device=t.device, generator=gen)
    return (torch.rand(t.shape, device=t.device, generator=gen) * 0.01 + 0.001).to(t.dtype)


def random_quant_linear(method: str, settings: dict[str, Any], out_f: int, in_f: int, name: str,
                        device: torch.device, gen: torch.Generator) -> QuantLinear:
    """A QuantLinear of the format with random codes, scales and (HARP) learned-looking rotations; q/k/v
    and gate/up share their input side's seed, as in a quantized checkpoint."""
    layer = Recipe.preset(method, **settings).for_module(name)
    prefix, _, leaf = name.rpartition(".")
    layer = replace(layer, input_seed=derive_seed(0, f"{prefix}.{SAME_INPUT_AS.get(leaf, leaf)}"))
    processor = make_processor(layer.processor_config())
    codebook = make_codebook(layer.codebook_config())
    codebook.check_shape(out_f, in_f, name)
    module = QuantLinear(in_f, out_f, codebook, processor, device=device)
    params = processor.init_buffers(out_f, in_f)
    for key, value in module.named_buffers():
        if key in params:
            start = params[key].to(device)
            if "theta" in key and start.dtype == torch.float16:  # not the S = 0 start: real fitted sizes
                start = (torch.randn(start.shape, device=device, generator=gen) * 0.05).half()
            value.copy_(start)
        elif key == "zeros" and value.is_floating_point():  # fp16 zero-points (HQQ): around the grid's middle,
            mid = (2 ** codebook.bits - 1) / 2  # so that weights have both signs, as real ones do
            value.copy_((torch.rand(value.shape, device=device, generator=gen) + mid - 0.5).to(value.dtype))
        else:
            value.copy_(_random_like(value, gen))
    return module


def _share_input_sides(linears: dict[str, nn.Module]) -> None:
    """Linears that read one input get one input side, as the pipeline fits them (HARP's learned stages
    included): each group's later members take the first member's side, as a quantized checkpoint's do."""
    for name, mod in linears.items():
        leader = input_group(name, linears)
        if isinstance(mod, QuantLinear) and leader != name and mod.input_side_names():
            mod.take_input_side(linears[leader], leader, equal_values=False)


def build(shape: DecoderShape, fmt: str, device: torch.device | str = "cuda", seed: int = 0) -> Decoder:
    """A decoder of `shape` in format `fmt` with random weights (fp16 everywhere outside the linears)."""
    if fmt not in FORMATS:
        raise HarpqError(f"unknown format {fmt!r} (offered: {', '.join(FORMATS)})")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    method, settings = FORMATS[fmt]
    std = shape.dim ** -0.5

    def fp16(out_f: int, in_f: int) -> nn.Linear:
        lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float16)
        lin.weight.data.normal_(0, std, generator=gen)
        return lin

    blocks = []
    for i in range(shape.layers):
        linears = {n: fp16(o, k) if method == "fp16" else
                   random_quant_linear(method, settings, o, k, f"model.layers.{i}.{n}", device, gen)
                   for n, (o, k) in shape.linear_shapes().items()}
        if method != "fp16":
            _share_input_sides(linears)
        ones = torch.ones(shape.dim, dtype=torch.float16, device=device)
        blocks.append(Block(shape, linears, ones, ones.clone()))
    embed = torch.randn(shape.vocab, shape.dim, device=device, generator=gen).mul_(std).half()
    return Decoder(shape, embed, blocks, torch.ones(shape.dim, dtype=torch.float16, device=device),
                   fp16(shape.vocab, shape.dim))


#: the linears whose input side a fused layer applies (q/k/v and gate/up share the first member's)
_INPUT_SIDES_READ = ("q_proj", "o_proj", "gate_proj", "down_proj")


def learned_side_bytes(blk: Block) -> int:
    """Bytes of the learned-run blocks (float32) a fused layer's kernels read for its sides, each side once."""
    sides = getattr(blk, "fused_sides", None)
    if sides is None:
        return 0
    total = 0
    for name, mod in sides.mods.items():
        out, inp = mod.kernel_sides(mod.codes_device())
        for side in (out, inp if name in _INPUT_SIDES_READ else None):
            if side is not None and side.learned:
                total += side.stages.numel() * side.stages.element_size()
    return total


def step_bytes(decoder: Decoder) -> dict[str, int]:
    """Bytes one decode step reads: linears (codes, scales, processor tables), norms, KV cache."""
    linear = 0
    for blk in decoder.blocks:
        for mod in [blk.qkv, blk.gate_up, *blk.linears.values()]:
            if mod is None:
                continue
            linear += sum(t.numel() * t.element_size() for t in (*mod.parameters(), *mod.buffers()))
            for sub in mod.modules():
                for _, (meta, plans) in getattr(sub, "_kernel_meta", {}).values():
                    # the kernels read run-time copies (fp16 scales, float32 stage blocks), not the stored ones
                    linear += sum(t.numel() * t.element_size() for t in meta)
                    linear += sum(p.blocks.numel() * 4 + p.signs.numel() * 4 for p in plans or ())
        linear += learned_side_bytes(blk)
    head = decoder.lm_head.weight.numel() * 2
    return {"linears": linear, "lm_head": head, "kv_cache": decoder.cache_bytes(),
            "total": linear + head + decoder.cache_bytes()}


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times[5:])[len(times[5:]) // 2]


def count_launches(runner: DecodeRunner, steps: int = 2) -> dict[str, float]:
    """Kernels per decode step, all and the online transforms' (stage kernels, the one-launch Hadamard, the
    block sides' own launches; not the kernels that apply a side beside their own work), from the
    profiler's record of `steps` graph replays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.decode(steps)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and not e.name.startswith(("Memcpy", "Memset"))]
    transforms = sum("_stage" in n or "harpq_hadamard" in n or n.split("(")[0].strip() == "_rotate" for n in names)
    return {"launches": len(names) / steps, "transform_launches": transforms / steps}


def time_decode(decoder: Decoder, batch: int, steps: int, prompt: int = 16, repeats: int = 3) -> tuple[float, dict]:
    """Seconds per decode step (median of `repeats` runs of `steps` graph replays), the bytes read and the
    kernel launches per step."""
    runner = DecodeRunner(decoder, batch, prompt + steps * (repeats + 1) + 8 + 2)
    tokens = torch.randint(0, decoder.shape.vocab, (batch, prompt), device=decoder.device)
    runner.prefill(tokens)
    runner.decode(steps)  # capture and warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.decode(steps)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return sorted(times)[len(times) // 2], {**step_bytes(decoder), **count_launches(runner)}


def run(shape_name: str, formats: list[str], batches: list[int], steps: int = 64,
        echo: Callable[[str], None] = print, json_path: str | Path | None = None) -> dict[str, Any]:
    """Decode tok/s of every format at every batch; with `json_path`, the result so far is written after
    each format (a run cut short keeps what it measured)."""
    if shape_name not in SHAPES:
        raise HarpqError(f"unknown shape {shape_name!r} (offered: {', '.join(SHAPES)})")
    if not torch.cuda.is_available():
        raise HarpqError("harpq bench times the CUDA decode path: no CUDA device here")
    if not formats:
        raise HarpqError(f"harpq bench needs at least one format (offered: {', '.join(FORMATS)})")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise HarpqError(f"unknown format(s) {', '.join(unknown)} (offered: {', '.join(FORMATS)})")
    device = torch.device("cuda")
    shape = SHAPES[shape_name]
    copy = copy_bandwidth(device)
    echo(f"{torch.cuda.get_device_name(device)}: device copy {copy / 1e12:.2f} TB/s (read + write)")
    rows: list[dict[str, Any]] = []
    for fmt in formats:
        start = time.perf_counter()
        decoder = build(shape, fmt, device)
        built = time.perf_counter() - start
        for batch in batches:
            try:
                seconds, nbytes = time_decode(decoder, batch, steps)
            except torch.cuda.OutOfMemoryError as e:
                echo(f"{fmt} batch {batch}: out of memory ({str(e).splitlines()[0]})")
                continue
            row = {"format": fmt, "batch": batch, "tok_s": batch / seconds, "step_ms": seconds * 1e3,
                   "bytes_per_step": nbytes["total"], "linear_bytes": nbytes["linears"],
                   "gb_s": nbytes["total"] / seconds / 1e9, "of_copy": nbytes["total"] / seconds / copy,
                   "launches": nbytes["launches"],
                   "transform_launches_per_layer": nbytes["transform_launches"] / shape.layers,
                   "build_s": round(built, 1)}
            rows.append(row)
            echo(f"{fmt:<11} batch {batch:>2}: {row['tok_s']:8.1f} tok/s  {row['step_ms']:7.3f} ms/step  "
                 f"{row['gb_s']:7.0f} GB/s ({row['of_copy']:.0%} of copy)  {row['launches']:.0f} launches")
        del decoder
        gc.collect()
        torch.cuda.empty_cache()
        for row in rows:
            base = next((r for r in rows if r["format"] == "fp16" and r["batch"] == row["batch"]), None)
            row["vs_fp16"] = row["tok_s"] / base["tok_s"] if base else None
        result = {"shape": shape_name, "device": torch.cuda.get_device_name(device), "copy_bytes_per_s": copy,
                  "steps": steps, "torch": torch.__version__, "rows": rows}
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['shape']} on {result['device']}, copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s",
             "| format | batch | tok/s | vs fp16 | GB/s | of copy | launches / token | transform launches / layer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vs = f"{r['vs_fp16']:.2f}×" if r["vs_fp16"] else "–"
        lines.append(f"| {r['format']} | {r['batch']} | {r['tok_s']:.1f} | {vs} | {r['gb_s']:.0f} "
                     f"| {r['of_copy']:.0%} | {r.get('launches', 0):.0f} "
                     f"| {r.get('transform_launches_per_layer', 0):.1f} |")
    return "\n".join(lines)
