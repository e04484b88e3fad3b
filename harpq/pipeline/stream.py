"""Calibration-free quantization straight from the checkpoint files, one tensor at a time.

Recipes that need no Hessian (RTN, HQQ) need no forward passes either: the model is built on the meta
device only to find its decoder layers and linears (generically, as the layer-wise pipeline does),
then every tensor is read from the safetensors shards, quantized on the device if it is a planned
linear weight, and written to the output shards as it goes. Peak memory: one tensor and its codes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import HarpqError
from ..io.checkpoint import ShardWriter
from ..io.model import check_finite, find_decoder_layers, input_group, layer_linears
from ..nn import QuantLinear
from ..recipe import LayerRecipe, derive_seed
from .linear import quantize_linear


def meta_skeleton(model_path: str | Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def planned_weights(skeleton: torch.nn.Module, plan: list[dict[str, LayerRecipe]], prefix: str,
                    base_seed: int = 0) -> dict:
    """Checkpoint key of each planned weight -> (module name, recipe, has bias, the full name of the linear
    whose input it reads); an experts matrix's key is its 3-D parameter's, its module name the experts
    module's. Linears that read one input get one input seed, derived as the layer-wise path derives it, so
    q/k/v and gate/up share their input side."""
    _, layers = find_decoder_layers(skeleton)
    out = {}
    for i, chosen in enumerate(plan):
        linears = layer_linears(layers[i])
        for rel, recipe in chosen.items():
            name = f"{prefix}.{i}.{rel}"
            if rel in linears:
                group = f"{prefix}.{i}.{input_group(rel, linears)}"
                seed = derive_seed(base_seed, group)
                out[f"{name}.weight"] = (name, replace(recipe, input_seed=seed), linears[rel].bias is not None, group)
            else:  # "<experts>.gate_up_proj" / "<experts>.down_proj"
                out[name] = (name.rpartition(".")[0], recipe, False, name)
    return out


@torch.no_grad()
def quantize_streaming(
    model_path: str | Path, tmp: Path, skeleton: torch.nn.Module, plan: list[dict[str, LayerRecipe]],
    prefix: str, device: torch.device, progress: bool = True, base_seed: int = 0,
) -> dict[str, dict]:
    """Quantize every planned linear of the checkpoint into `tmp`; returns the module specs.

    `skeleton` is the model on the meta device that `plan` was made from.
    """
    targets = planned_weights(skeleton, plan, prefix, base_seed)
    expected = expected_tensors(skeleton)
    seen: set[str] = set()
    experts: dict[str, dict[str, list]] = {}
    writer = ShardWriter(tmp)
    specs: dict[str, dict] = {}
    #: input group -> (the first of its linears written, that linear's input side): the side is stored once
    holders: dict[str, tuple[str, QuantLinear]] = {}
    shards = sorted(Path(model_path).glob("*.safetensors"))
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="quantizing", unit="tensor", disable=not progress) as bar, \
            (tmp / "quant_log.jsonl").open("a") as log:
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    bar.update(1)
                    tensor = f.get_tensor(key)
                    if key in expected:
                        if tuple(tensor.shape) != expected[key]:
                            raise HarpqError(f"{key} in {shard.name} has shape {tuple(tensor.shape)}, the "
                                             f"architecture needs {expected[key]}: the checkpoint does not match "
                                             "its config.json")
                        seen.add(key)
                    if tensor.is_floating_point():
                        check_finite(key, tensor)
                    if key not in targets:
                        writer.add(key, tensor)
                        continue
                    name, layer_recipe, has_bias, group = targets[key]
                    if tensor.dim() == 3:  # one matrix of every expert
                        which = key.rpartition(".")[2]
                        short = which.removesuffix("_proj")
                        for e in range(tensor.shape[0]):
                            module, report = quantize_linear(f"{key}.{e}", tensor[e].to(device), None, layer_recipe)
                            experts.setdefault(name, {}).setdefault(which, []).append(module.spec())
                            for buf, value in module.state_dict().items():
                                writer.add(f"{name}.{short}.{e}.{buf}", value)
                            log.write(json.dumps(report.to_dict()) + "\n")
                        continue
                    module, report = quantize_linear(name, tensor.to(device), None, layer_recipe)
                    holder = holders.get(group)
                    if holder is not None and module.shares_input_side(holder[1]):
                        module.take_input_side(holder[1], holder[0])  # not written again below
                    elif holder is None and module.input_side_names():
                        holders[group] = (name, _input_side_only(module))
                    specs[name] = {**module.spec(), "bias": has_bias}  # the bias is copied as it stands
                    for buf, value in module.state_dict().items():
                        writer.add(f"{name}.{buf}", value)
                    log.write(json.dumps(report.to_dict()) + "\n")
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HarpqError(f"{missing[0]}{more} missing from the checkpoint {model_path}")
    writer.close()
    act = getattr(skeleton.config, "hidden_act", "silu")
    for name, mats in experts.items():
        specs[name] = {"kind": "experts", "hidden_act": act, **mats}
    return specs


def _input_side_only(module: QuantLinear) -> QuantLinear:
    """A stand-in for `module` that keeps only its input side (what later members of its group compare
    with), so the stream does not hold the module's codes."""
    keep = QuantLinear.from_spec(module.spec(), device="meta")
    for name in module.input_side_names():
        keep._buffers[name] = module._buffers[name].detach().clone()
    return keep


def expected_tensors(skeleton: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture stores -> its shape (a tied output head is not stored)."""
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(skeleton.config, "tie_word_embeddings", False):
        out = skeleton.get_output_embeddings()
        for k in [k for k in shapes if out is not None and k.endswith("weight") and k.startswith("lm_head")]:
            shapes.pop(k)
    return shapes
