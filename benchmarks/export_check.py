"""Perplexity of an exported model loaded by transformers + compressed-tensors against harpq's own load.

    python benchmarks/export_check.py [--model ../shared/models/llama-small] [--windows 128]

Quantizes the model with RTN 4-bit, group 32 (llama-small's widths 512 and 1376 are multiples of 32),
exports it to compressed-tensors, and scores the first `--windows` windows of 512 tokens of
../shared/data/gutenberg_test.txt with both loads (float32 compute on the CPU; the export keeps scales
in the model's bf16, which the numbers include), FP beside them, all in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import harpq
from harpq.eval.perplexity import perplexity
from harpq.io.export import export
from harpq.io.model import load_tokenizer
from harpq.io.text import read_text
from harpq.pipeline.calibration import tokenize_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="../shared/models/llama-small")
    parser.add_argument("--text", default="../shared/data/gutenberg_test.txt")
    parser.add_argument("--windows", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tokens = tokenize_text(load_tokenizer(args.model), read_text(args.text))[: args.windows * 512]
    with tempfile.TemporaryDirectory() as d:
        q = harpq.quantize(args.model, Path(d) / "q", harpq.Recipe.preset("rtn", bits=4, group_size=32),
                           progress=False)
        ct = export(q, Path(d) / "ct", "compressed-tensors")
        loads = {
            "fp (harpq.load)": lambda: harpq.load(args.model),
            "harpq.load (rtn 4-bit g32)": lambda: harpq.load(q),
            "transformers + compressed-tensors (export)": lambda: AutoModelForCausalLM.from_pretrained(
                ct, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)),
        }
        print(f"{args.windows} windows of 512 tokens of {Path(args.text).name}, CPU float32")
        print("| load | perplexity | seconds |")
        print("|---|---|---|")
        for name, make in loads.items():
            start = time.perf_counter()
            ppl = perplexity(make().eval(), tokens, 512, progress=False)
            print(f"| {name} | {ppl:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
