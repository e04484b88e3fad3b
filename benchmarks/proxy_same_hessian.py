"""HARP against the transform it starts from (QuIP#'s RHT) on the same Hessians, module by module.

    python benchmarks/proxy_same_hessian.py ../shared/models/llama-small --bits 4 \
        --calib ../shared/data/gutenberg_valid.txt --nsamples 32 [--json out.json]

A `harpq quantize --method harp` run (defaults) in which every linear, or group of linears sharing an input side,
is also quantized with the RHT in HARP's place (quipsharp's processor, same seeds, codebook, rounding and scale),
on the same weights and the same Hessian; the RHT result is discarded. Two separate runs cannot compare so:
from layer 1 on each collects its Hessians through its own quantized earlier layers. Prints the proxy loss of
both per module and their ratio, and the worst ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import harpq

pipeline = importlib.import_module("harpq.pipeline.quantize")  # the module, not its `quantize`


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rows: list[dict] = []
    real_linear, real_shared = pipeline.quantize_linear, pipeline.quantize_shared_input

    def start_loss(name, linear, hessian, recipe) -> float | None:
        _, report = real_linear(name, linear, hessian, replace(recipe, processor="rht"))
        return report.proxy_loss

    def record(name, report, rht) -> None:
        rows.append({"module": name, "harp": report.proxy_loss, "rht": rht, "ratio": report.proxy_loss / rht})
        print(f"{name}: harp {report.proxy_loss:.6g}  rht {rht:.6g}  ratio {report.proxy_loss / rht:.4f}", flush=True)

    def linear(name, lin, hessian, recipe, *a, **k):
        out = real_linear(name, lin, hessian, recipe, *a, **k)
        if recipe.processor == "harp":
            record(name, out[1], start_loss(name, lin, hessian, recipe))
        return out

    def shared(names, lins, hessian, recipes):
        rhts = [start_loss(n, lin, hessian, r) for n, lin, r in zip(names, lins, recipes, strict=True)]
        results = real_shared(names, lins, hessian, recipes)
        for n, (_, report), rht in zip(names, results, rhts, strict=True):
            record(n, report, rht)
        return results

    pipeline.quantize_linear, pipeline.quantize_shared_input = linear, shared
    with tempfile.TemporaryDirectory() as tmp:
        harpq.quantize(args.model, Path(tmp) / "out", harpq.Recipe.preset("harp", bits=args.bits), calib=args.calib,
                       nsamples=args.nsamples, progress=False)
    ratios = [r["ratio"] for r in rows]
    above = [r["module"] for r in rows if r["ratio"] > 1]
    print(f"\n{len(rows)} linears, harp / rht proxy loss on the same Hessian: min {min(ratios):.3f}, median "
          f"{statistics.median(ratios):.3f}, max {max(ratios):.3f}; above the RHT: {above or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
