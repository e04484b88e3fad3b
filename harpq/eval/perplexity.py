"""Paper-style perplexity: tokenize once, non-overlapping windows of `ctx`, drop the remainder.

ppl = exp(mean token NLL over all windows), each window predicting its own ctx − 1 next tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import HarpqError
from ..nn import QuantLinear


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: torch.Tensor, ctx: int, batch_size: int = 8, progress: bool = True,
    desc: str = "ppl",
) -> float:
    """Perplexity of `model` on the 1-D token tensor `tokens` at context length `ctx`."""
    windows = tokens.numel() // ctx
    if windows == 0:
        raise HarpqError(f"the text has {tokens.numel()} tokens, fewer than one window of {ctx}")
    device = next(model.parameters()).device
    data = tokens[: windows * ctx].view(windows, ctx)
    total, count = 0.0, 0
    for i in tqdm(range(0, windows, batch_size), desc=desc, disable=not progress, leave=False):
        batch = data[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits of the quantized linears over their weight count; 16 for an unquantized model."""
    bits, weights = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += m.stored_bits()
            weights += m.in_features * m.out_features
    return bits / weights if weights else 16.0
