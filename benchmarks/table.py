"""Render a results JSONL file (from benchmarks/quality.py) as a Markdown table.

    python benchmarks/table.py benchmarks/results/foundation.jsonl
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    fp = next((r["ppl"] for r in rows if r["config"] == "fp"), None)
    print("| config | bits/weight | ppl | vs FP | quantize s | median proxy loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = "" if fp is None or r["config"] == "fp" else f"{100 * (r['ppl'] / fp - 1):+.1f} %"
        loss = r.get("median_proxy_loss")
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {rel} | {r['quant_seconds']} | "
              f"{'' if loss is None else f'{loss:.4f}'} |")


if __name__ == "__main__":
    main()
