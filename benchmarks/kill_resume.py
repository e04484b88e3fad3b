"""Kill test: SIGKILL a quantization at random moments, rerun the same command each time, compare.

    python benchmarks/kill_resume.py [--kills 10] [--model ../shared/models/llama-small] [--out runs/kill]

One uninterrupted run gives the reference `model.safetensors`. Then the same command is started, killed
with SIGKILL after a random delay (by default 3–25 % of the reference's duration: start-up, calibration,
any layer), and started again, `--kills` times; the last start runs to completion. Prints each attempt
(seconds, the layers it found finished) and whether the final weights are bit-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def command(model: str, out: Path, calib: str) -> list[str]:
    return [sys.executable, "-m", "harpq", "quantize", model, str(out), "--method", "gptq", "--bits", "4",
            "--group-size", "128", "--ragged-groups", "--calib", calib, "--nsamples", "64", "--seqlen", "512"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--model", default="../shared/models/llama-small")
    parser.add_argument("--calib", default="../shared/data/gutenberg_valid.txt")
    parser.add_argument("--out", default="runs/kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", default="0.03,0.25", help="kill delays: fractions of the uninterrupted time")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)
    lo, hi = map(float, args.window.split(","))

    start = time.perf_counter()
    subprocess.run(command(args.model, root / "reference", args.calib), check=True, capture_output=True)
    full = time.perf_counter() - start
    print(f"uninterrupted: {full:.1f} s")
    out = root / "resumed"
    for attempt in range(args.kills + 1):
        start = time.perf_counter()
        proc = subprocess.Popen(command(args.model, out, args.calib), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        killed = attempt < args.kills
        if killed:
            try:
                proc.wait(timeout=rng.uniform(lo, hi) * full)
                killed = False  # it finished before the kill
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        found = re.search(r"resuming: (\d+) decoder layers", err)
        print(f"attempt {attempt + 1}: {'killed' if killed else 'finished'} after "
              f"{time.perf_counter() - start:.1f} s, found {found.group(1) if found else 0} layers done"
              + ("" if killed or proc.returncode == 0 else f", exit {proc.returncode}: {err.strip()[-300:]}"))
        if not killed and proc.returncode == 0:
            break
    same = digest(out / "model.safetensors") == digest(root / "reference" / "model.safetensors")
    same_config = (out / "config.json").read_bytes() == (root / "reference" / "config.json").read_bytes()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    print(f"model.safetensors bit-identical: {same}; config.json identical: {same_config}; leftovers: {leftovers}")


if __name__ == "__main__":
    main()
