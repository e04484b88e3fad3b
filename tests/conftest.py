from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harpq

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY = SHARED / "models" / "llama-tiny"
CALIB = SHARED / "data" / "gutenberg_valid.txt"
TEST_TEXT = SHARED / "data" / "gutenberg_test.txt"


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
