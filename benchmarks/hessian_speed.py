"""Time to collect the proxy Hessians of one decoder layer of a real model shape, as the pipeline does.

    python benchmarks/hessian_speed.py --shape llama-2-7b            # on the GPU
    python benchmarks/hessian_speed.py --shape llama-2-70b --nsamples 128 --seqlen 512

A Llama decoder layer of the shape with random weights, in float32 on the device (as the layer-wise pipeline
runs each layer), and random calibration inputs of the pipeline's default size (128 windows of 512 tokens). Two
figures per layer: the forward pass with `HessianCollector`'s hooks (Σ xxᵀ in float64 for each distinct input:
q/k/v and gate/up share theirs) and the plain forward pass, which the pipeline runs once more after quantizing the
layer to make the next layer's inputs. The whole-model figure is their sum × the layer count: the part of a
quantization run that HARP's fit-time figures (`harp_fit_speed.py`) leave out.
"""

from __future__ import annotations

import argparse
import time

import torch

from harpq.pipeline.hessian import HessianCollector

SHAPES = {  # hidden, mlp, layers, heads, kv heads
    "llama-small": (512, 1376, 8, 8, 4),
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-2-70b": (8192, 28672, 80, 64, 8),
}


def decoder_layer(shape: str, device: str):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hidden, mlp, _, heads, kv = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=1, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(device, torch.float32)
    return layer, LlamaRotaryEmbedding(config).to(device)


def run(layer, rope, inputs: torch.Tensor, batch: int, collector: HessianCollector | None) -> float:
    pos = torch.arange(inputs.shape[1], device=inputs.device)[None]
    emb = rope(inputs[:1], pos)
    torch.cuda.synchronize() if inputs.is_cuda else None
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            layer(inputs[i:i + batch], position_embeddings=emb, position_ids=pos)
            if collector is not None:
                collector.end_pass()
    torch.cuda.synchronize() if inputs.is_cuda else None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer, rope = decoder_layer(args.shape, device)
    hidden, _, layers, _, _ = SHAPES[args.shape]
    inputs = torch.randn(args.nsamples, args.seqlen, hidden, device=device)
    run(layer, rope, inputs[: args.batch], args.batch, None)  # warm-up
    plain = run(layer, rope, inputs, args.batch, None)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    collector = HessianCollector(linears)
    hooked = run(layer, rope, inputs, args.batch, collector)
    collector.remove()
    groups = sorted({collector.group_of[n] for n in linears})
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{args.shape} on {name}: {args.nsamples} × {args.seqlen} tokens, {len(groups)} Hessians per layer "
          f"({', '.join(f'{g} {collector.sums[g].shape[0]}' for g in groups)})")
    print("| per layer | forward with the Hessian hooks | plain forward (next inputs) | both |")
    print("|---|---|---|---|")
    print(f"| {args.shape} | {hooked:.2f} s | {plain:.2f} s | {hooked + plain:.2f} s |")
    total = (hooked + plain) * layers
    print(f"whole model ({layers} layers): {total:.0f} s = {total / 3600:.3f} h")


if __name__ == "__main__":
    main()
