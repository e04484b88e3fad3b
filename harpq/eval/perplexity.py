"""Paper-style perplexity: tokenize once, non-overlapping windows of `ctx`, drop the remainder.

ppl = exp(mean token NLL over all windows), each window predicting its own ctx − 1 next tokens. With
`max_windows`, that many windows spread evenly over the text (first and last included) stand for it: a
quick estimate whose slice is stated beside the number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import HarpqError
from ..nn import QuantLinear


def window_count(tokens: int, ctx: int) -> int:
    windows = tokens // ctx
    if windows == 0:
        raise HarpqError(f"the text has {tokens} tokens, fewer than one window of {ctx}")
    return windows


def spread_windows(total: int, max_windows: int | None) -> torch.Tensor:
    """Indices of `max_windows` of `total` windows, evenly spread from the first to the last (all if None)."""
    if max_windows is not None and max_windows < 1:
        raise HarpqError(f"--max-windows must be at least 1, not {max_windows}")
    if max_windows is None or max_windows >= total:
        return torch.arange(total)
    if max_windows == 1:
        return torch.tensor([0])
    return torch.tensor([round(i * (total - 1) / (max_windows - 1)) for i in range(max_windows)])


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: torch.Tensor, ctx: int, batch_size: int = 8, progress: bool = True,
    desc: str = "ppl", max_windows: int | None = None,
) -> float:
    """Perplexity of `model` on the 1-D token tensor `tokens` at context length `ctx` (over `max_windows`
    evenly spread windows if given)."""
    windows = window_count(tokens.numel(), ctx)
    device = next(model.parameters()).device
    data = tokens[: windows * ctx].view(windows, ctx)[spread_windows(windows, max_windows)]
    windows = data.shape[0]
    total, count = 0.0, 0
    for i in tqdm(range(0, windows, batch_size), desc=desc, disable=not progress, leave=False):
        batch = data[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight of the decoder layers' linears and experts (quantized ones: codes, scales,
    zeros, processor parameters; any left unquantized count 16 bits); 16 for an unquantized model."""
    from ..io.model import find_decoder_layers
    from ..pipeline.experts import EXPERT_MATRICES, is_experts

    try:
        _, layers = find_decoder_layers(model)
    except HarpqError:
        layers = [model]
    bits = weights = 0
    quantized = False
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                bits += m.stored_bits()
                weights += m.in_features * m.out_features
                quantized = True
            elif isinstance(m, nn.Linear):
                bits += 16 * m.weight.numel()
                weights += m.weight.numel()
            elif is_experts(m):
                n = sum(getattr(m, w).numel() for w in EXPERT_MATRICES)
                bits, weights = bits + 16 * n, weights + n
    return bits / weights if quantized and weights else 16.0


def unquantized_weights(model: nn.Module) -> int:
    """Weights of the decoder layers' linears and experts left in floating point."""
    from ..io.model import find_decoder_layers
    from ..pipeline.experts import EXPERT_MATRICES, is_experts

    _, layers = find_decoder_layers(model)
    return sum(m.weight.numel() if isinstance(m, nn.Linear) else sum(getattr(m, w).numel() for w in EXPERT_MATRICES)
               for layer in layers for m in layer.modules()
               if (isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)) or is_experts(m))
