from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (read at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harpq  # noqa: E402

# the data and models beside the checkout; HARPQ_SHARED points elsewhere (a GPU machine gets only the repo)
SHARED = Path(os.environ.get("HARPQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")
TINY = SHARED / "models" / "llama-tiny"
CALIB = SHARED / "data" / "gutenberg_valid.txt"
TEST_TEXT = SHARED / "data" / "gutenberg_test.txt"
TASKS_DIR = SHARED / "data" / "tasks"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    assert TINY.is_dir(), f"reference model missing: {TINY}"
    return TINY


@pytest.fixture(scope="session")
def tiny_gptq(tmp_path_factory, tiny_path) -> Path:
    """llama-tiny quantized once with 4-bit GPTQ, one group per row (shared by several tests)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-gptq4"
    harpq.quantize(tiny_path, out, harpq.Recipe.preset("gptq", bits=4, group_size=0), calib=CALIB,
                   nsamples=8, seqlen=128, progress=False)
    return out


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 60 kB of the held-out test text: enough windows for a quick, stable perplexity."""
    path = tmp_path_factory.mktemp("text") / "gutenberg_small.txt"
    path.write_text(TEST_TEXT.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path
