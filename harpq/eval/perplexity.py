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
