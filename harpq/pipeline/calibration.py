"""Calibration windows: `nsamples` random windows of `seqlen` tokens from a text file, seeded."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HarpqError
from ..io.text import read_text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D token tensor (tokenized once, as the perplexity protocol does)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.view(-1)


def calibration_windows(tokenizer, path: str | Path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token windows drawn uniformly at random (with a seed) from the file."""
    if nsamples < 1 or seqlen < 2:
        raise HarpqError(f"need at least one calibration window of 2+ tokens, got {nsamples} × {seqlen}")
    ids = tokenize_text(tokenizer, read_text(path))
    if ids.numel() < seqlen:
        raise HarpqError(
            f"calibration text {path} has {ids.numel()} tokens, fewer than one window of {seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
