"""Perplexity and quantization time of each method/bits/group setting on one model (CPU or GPU).

    python benchmarks/quality.py --model ../shared/models/llama-small \
        --configs rtn:4:128 gptq:4:128 rtn:3:128 gptq:3:128 rtn:2:64 gptq:2:64 rtn:2:0 gptq:2:0

Each config is METHOD:BITS:GROUP (GROUP 0 = one group per row), optionally followed by recipe
overrides, e.g. gptq:2:0:processor=rht:rounding=nearest. Every model is quantized to a
checkpoint, loaded back from disk and evaluated, so the numbers are those of the saved files. The FP
baseline is measured in the same run. One JSON line per config goes to --out; a Markdown table is
printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import harpq
from harpq.io.model import load_tokenizer


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--configs", nargs="+", required=True, help="METHOD:BITS:GROUP[:key=value...], e.g. gptq:4:128")
    ap.add_argument("--ppl", default="../shared/data/gutenberg_test.txt")
    ap.add_argument("--calib", default="../shared/data/gutenberg_valid.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the evaluations")
    ap.add_argument("--extra", default="{}", help="JSON dict of extra recipe settings for every config")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/quality.jsonl")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    dtype = getattr(torch, args.dtype)
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": Path(args.model).name,
             "ppl_file": Path(args.ppl).name, "ctx": args.ctx, "dtype": args.dtype,
             "calib": f"{Path(args.calib).name} {args.nsamples}x{args.seqlen}"}
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:  # each row as soon as it is measured: a cut-short run keeps its rows
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    if not args.no_baseline:
        t = time.perf_counter()
        r = harpq.evaluate(args.model, [args.ppl], ctx=args.ctx, device=args.device, dtype=dtype)
        record({**stamp, "config": "fp", "bits_per_weight": 16.0, "ppl": r["ppl"][Path(args.ppl).stem],
                     "quant_seconds": 0.0, "eval_seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    extra = json.loads(args.extra)
    for config in args.configs:
        method, bits, group, *pairs = config.split(":")
        settings = {**extra, **{k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}}
        recipe = harpq.Recipe.preset(method, bits=int(bits), group_size=int(group), ragged_groups=True, **settings)
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "q"
            t = time.perf_counter()
            harpq.quantize(args.model, out, recipe, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                           device=args.device, progress=False)
            qsec = time.perf_counter() - t
            log = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
            losses = [e["proxy_loss"] for e in log if e["proxy_loss"] is not None]
            t = time.perf_counter()
            model = harpq.load(out, device=args.device, dtype=dtype)
            r = harpq.evaluate(model, [args.ppl], ctx=args.ctx, tokenizer=tok, progress=False)
        record({**stamp, "config": config, "extra": extra, "bits_per_weight": r["bits_per_weight"],
                     "ppl": r["ppl"][Path(args.ppl).stem], "quant_seconds": round(qsec, 1),
                     "eval_seconds": round(time.perf_counter() - t, 1),
                     "median_proxy_loss": statistics.median(losses) if losses else None,
                     "proxy_loss": {e["module"]: e["proxy_loss"] for e in log},
                     **({"fit": {e["module"]: e["fit"] for e in log}} if any("fit" in e for e in log) else {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("proxy_loss", "fit")}), flush=True)
    print(f"\n| config | bits/weight | ppl ({stamp['ppl_file']}, ctx {args.ctx}) | quantize s | median proxy loss |")
    print("|---|---|---|---|---|")
    for row in rows:
        loss = row.get("median_proxy_loss")
        print(f"| {row['config']} | {row['bits_per_weight']:.3f} | {row['ppl']:.3f} | {row['quant_seconds']} | "
              f"{'' if loss is None else f'{loss:.4g}'} |")


if __name__ == "__main__":
    main()
