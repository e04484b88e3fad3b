"""lm-evaluation-harness (v0.4 API) adapter for a model held in memory, quantized by harpq or not.

lm_eval stays optional: `HarpqLM` holds all the scoring and only needs request objects with `.args`;
`lm_eval_model_class()` imports lm_eval on first use, builds the `lm_eval.api.model.LM` subclass and
registers it as "harpq". Scoring reuses the zero-shot code, so numbers match `harpq eval --tasks`.

    lm = make_lm_eval_model(model, tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import default_dtype, load
from ..errors import HarpqError
from ..io.model import load_tokenizer
from .zeroshot import Pair, encode_pair, loglikelihoods

DEFAULT_BATCH_SIZE = 8


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Pair]:
    """(context, continuation) pairs predicting every token once, as lm_eval's rolling windows
    (`get_rolling_token_windows` with context_len=1, made disjoint): the first window is conditioned
    on `prefix`, each later one on the tokens before it, so a model sees at most `max_length`."""
    pairs = []
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        pairs.append(([prefix] if start == 0 else tokens[end - max_length - 1: start], tokens[start:end]))
    return pairs


def _dtype(value: str | torch.dtype | None, device: str) -> torch.dtype:
    """A dtype from lm_eval's model_args string; None and "auto" mean harpq's default for the device."""
    if value is None or value == "auto":
        return default_dtype(device)
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise HarpqError(f"unknown dtype {value!r} (try float16, bfloat16 or float32)")
    return dtype


def _batch_size(value: int | str | None) -> int:
    """lm_eval passes the batch size as given on its command line: an int, a string or None."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and not value.strip().isdigit():
        raise HarpqError(f"batch size must be a positive integer, not {value!r} (harpq has no 'auto' batch size)")
    if int(value) < 1:
        raise HarpqError(f"batch size must be a positive integer, not {value!r}")
    return int(value)


class HarpqLM:
    """The scoring half of the adapter; it works without lm_eval installed.

    `pretrained` is a loaded causal LM (then `tokenizer` is required) or a model directory loaded with
    `harpq.load`. Contexts and texts are encoded without special tokens, as harpq's zero-shot scoring
    does; an empty context and the first rolling window are conditioned on BOS (EOS without one).
    """

    def __init__(
        self, pretrained: str | Path | nn.Module, tokenizer: Any = None, device: str | None = None,
        batch_size: int | str | None = None, max_length: int | None = None, dtype: str | torch.dtype | None = None,
        max_batch_size: int | None = None,  # passed by lm_eval.simple_evaluate; unused
    ) -> None:
        super().__init__()  # lm_eval's LM sets its rank, world size and cache hook here
        if isinstance(pretrained, nn.Module):
            if tokenizer is None:
                raise HarpqError("an in-memory model needs its tokenizer")
            model = pretrained if device is None else pretrained.to(device)
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load(pretrained, device=device, dtype=_dtype(dtype, device))
            tokenizer = tokenizer or load_tokenizer(pretrained)
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self._batch_size = _batch_size(batch_size)
        if max_length is not None and int(max_length) < 1:
            raise HarpqError(f"max_length must be at least 1, not {max_length}")
        self._max_length = int(max_length or getattr(model.config, "max_position_embeddings", None) or 2048)
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if self.prefix_token_id is None:
            raise HarpqError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _pair(self, context: str, continuation: str) -> Pair:
        ctx, cont = encode_pair(self.tokenizer, context, continuation)
        if not ctx:  # as lm_eval: an empty context becomes the prefix token, unless the continuation starts with it
            prefix = self.prefix_token_id
            ctx, cont = (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        if len(cont) > self._max_length:
            raise HarpqError(f"a continuation of {len(cont)} tokens is longer than max_length {self._max_length}")
        return ctx, cont

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), greedy decoding reproduces it) per `(context, continuation)`."""
        pairs = [self._pair(*_args(r, 2, "loglikelihood")) for r in requests]
        return loglikelihoods(self.model, pairs, self._batch_size, self._max_length, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) per `(text,)`, over disjoint windows of max_length tokens (perplexity tasks)."""
        windows = [rolling_windows(self._encode(*_args(r, 1, "loglikelihood_rolling")), self.prefix_token_id,
                                   self._max_length) for r in requests]
        scores = loglikelihoods(self.model, [w for ws in windows for w in ws], self._batch_size, self._max_length,
                                progress=not disable_tqdm, desc="rolling")  # all windows batched together
        out, at = [], 0
        for ws in windows:
            out.append(sum((ll for ll, _ in scores[at: at + len(ws)]), 0.0))
            at += len(ws)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each `(context, gen_kwargs)`, cut at the first `until` string."""
        out = []
        for r in requests:
            context, kwargs = _args(r, 2, "generate_until")
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise HarpqError("harpq's lm_eval adapter decodes greedily only (do_sample=False, temperature=0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = (self._encode(context) or [self.prefix_token_id])[-max(1, self._max_length - max_new):]
            gen = self.model.generate(
                torch.tensor([ids], device=self._device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                device=self._device), max_new_tokens=max_new, do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id if self.tokenizer.pad_token_id is None
                else self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **({"stop_strings": until, "tokenizer": self.tokenizer} if until else {}),
            )
            text = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def _args(request: Any, n: int, kind: str) -> tuple:
    """A request's `.args`, checked: a wrong shape would otherwise fail deep inside tokenisation."""
    args = getattr(request, "args", None)
    if not isinstance(args, tuple) or len(args) != n or not isinstance(args[0], str):
        raise HarpqError(f"a {kind} request needs .args = a {n}-tuple starting with a string, not {args!r}")
    if kind == "loglikelihood" and not isinstance(args[1], str):
        raise HarpqError(f"a loglikelihood continuation must be a string, not {type(args[1]).__name__}")
    return args


@functools.cache
def lm_eval_model_class() -> type:
    """`HarpqLM` as an `lm_eval.api.model.LM`, registered with lm_eval as "harpq" (built once)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise HarpqError("lm_eval is not installed: pip install 'harpq[lm-eval]'") from None
    cls = type("HarpqEvalLM", (HarpqLM, LM), {"__module__": __name__, "__doc__": HarpqLM.__doc__})
    return register_model("harpq")(cls)


def make_lm_eval_model(pretrained: str | Path | nn.Module, tokenizer: Any = None, **kwargs: Any) -> Any:
    """An lm_eval LM for `simple_evaluate(model=...)`; kwargs as `HarpqLM` (device, batch_size, ...)."""
    return lm_eval_model_class()(pretrained, tokenizer, **kwargs)
