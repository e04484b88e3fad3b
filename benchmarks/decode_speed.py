"""Decode tok/s on the GPU, FP16 against each format, random weights of a real shape (`harpq bench`).

    python benchmarks/decode_speed.py --shape llama-2-7b --batch 1,4 --json out.json

The same as the CLI command, without needing click on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harpq.engine import bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--formats", default=",".join(bench.FORMATS))
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    result: dict = {}
    for fmt in args.formats.split(","):  # one format at a time, the JSON rewritten after each
        part = bench.run(args.shape, [fmt], batches, args.steps, echo=lambda s: print(s, flush=True))
        rows = result.get("rows", []) + part["rows"]
        result = {**part, "rows": rows}
        for row in rows:
            base = next((r for r in rows if r["format"] == "fp16" and r["batch"] == row["batch"]), None)
            row["vs_fp16"] = row["tok_s"] / base["tok_s"] if base else None
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(bench.table(result))

if __name__ == "__main__":
    main()
