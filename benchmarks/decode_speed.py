"""Decode tok/s on the GPU, FP16 against each format, random weights of a real shape (`harpq bench`).

    python benchmarks/decode_speed.py --shape llama-2-7b --batch 1,4 --json out.json

The same as the CLI command, without needing click on the GPU machine.
"""

from __future__ import annotations

import argparse

from harpq.engine import bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--formats", default=",".join(bench.FORMATS))
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = bench.run(args.shape, args.formats.split(","), [int(b) for b in args.batch.split(",")], args.steps,
                       echo=lambda s: print(s, flush=True), json_path=args.json)
    print(bench.table(result))


if __name__ == "__main__":
    main()
