"""The lm-evaluation-harness adapter against hand computations from the model's logits.

lm_eval is not needed: requests are plain objects with `.args`, and the LM subclass is built against a
stand-in `lm_eval` package.
"""

from __future__ import annotations

import abc
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from harpq import HarpqError
from harpq.eval.lm_eval_adapter import HarpqLM, lm_eval_model_class, make_lm_eval_model, rolling_windows
from harpq.io.model import load_model, load_tokenizer

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity.")


@dataclass
class Req:
    args: tuple


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path, dtype=torch.float32), load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def lm(tiny):
    return HarpqLM(*tiny, batch_size=3)


def logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token) at every position of one unpadded sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def hand_score(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = logprobs(model, ctx + cont)[len(ctx) - 1: -1]
    target = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), target].sum()), bool((lp.argmax(-1) == target).all())


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(logprobs(model, ids + out)[-1].argmax()))
    return out


def test_loglikelihood_matches_the_logits(tiny, lm):
    model, tok = tiny
    greedy = tok.decode(greedy_tokens(model, encode(tok, "Once upon a time"), 3))
    items = [("The quick brown fox jumps over", " the lazy dog"), ("Question: is tea hot? Answer: ", "yes"),
             ("", "Once upon a time"), ("Once upon a time", greedy)]
    got = lm.loglikelihood([Req(i) for i in items])
    for (context, continuation), (ll, is_greedy) in zip(items, got, strict=True):
        stripped = context.rstrip()  # the harness moves trailing spaces into the continuation
        ctx = encode(tok, stripped) if stripped else [tok.bos_token_id]
        whole = encode(tok, context + continuation)
        cont = whole[len(ctx):] if stripped else whole
        assert not stripped or whole[: len(ctx)] == ctx
        want_ll, want_greedy = hand_score(model, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert is_greedy == want_greedy
    assert tok.decode(encode(tok, items[1][0] + items[1][1])[len(encode(tok, items[1][0].rstrip())):]) == " yes"
    assert [g for _, g in got] == [False, False, False, True]


def test_rolling_windows_follow_the_harness_example():
    # lm_eval's LM.loglikelihood_rolling docstring: tokens 0..9, max length 4, each token predicted once
    assert rolling_windows(list(range(10)), -1, 4) == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows([], -1, 4) == []


def test_loglikelihood_rolling_short_text_is_conditioned_on_bos(tiny, lm):
    model, tok = tiny
    text = "It was a dark and stormy night."
    ids = encode(tok, text)
    lp = logprobs(model, [tok.bos_token_id] + ids)
    want = sum(float(lp[i, t]) for i, t in enumerate(ids))
    assert lm.loglikelihood_rolling([Req((text,))])[0] == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_long_text_uses_windows(tiny):
    model, tok = tiny
    ids, window = encode(tok, TEXT), 16
    assert len(ids) > 2 * window and len(ids) % window  # full windows and a partial last one
    want = 0.0
    for start in range(0, len(ids), window):  # each window sees `window` tokens, scores its new ones
        end = min(start + window, len(ids))
        inp = [tok.bos_token_id] + ids[: end - 1] if start == 0 else ids[end - window - 1: end - 1]
        assert len(inp) <= window
        lp = logprobs(model, inp)[len(inp) - (end - start):]
        want += float(lp[torch.arange(end - start), torch.tensor(ids[start:end])].sum())
    got = HarpqLM(model, tok, max_length=window).loglikelihood_rolling([Req((TEXT,))])[0]
    assert got == pytest.approx(want, abs=1e-3)
    full = HarpqLM(model, tok).loglikelihood_rolling([Req((TEXT,))])[0]
    assert abs(full - got) > 1e-2  # the short window really cut the context


def test_batched_results_equal_unbatched_ones(tiny):
    model, tok = tiny
    pairs = [Req(("A", " b")), Req(("The quick brown fox jumps over", " the lazy dog")),
             Req(("Question: why \n", " because")), Req(("", "Hello"))]
    texts = [Req((TEXT,)), Req(("Short.",)), Req((TEXT[:60],))]
    one, many = HarpqLM(model, tok, batch_size=1, max_length=24), HarpqLM(model, tok, batch_size=4, max_length=24)
    for (a, ga), (b, gb) in zip(one.loglikelihood(pairs), many.loglikelihood(pairs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert many.loglikelihood_rolling(texts) == pytest.approx(one.loglikelihood_rolling(texts), abs=1e-4)


def test_generate_until_is_greedy_and_stops(tiny, lm):
    model, tok = tiny
    context = "Once upon a time"
    want = tok.decode(greedy_tokens(model, encode(tok, context), 6), skip_special_tokens=True)
    assert lm.generate_until([Req((context, {"until": [], "max_gen_toks": 6}))]) == [want]
    stop = want[len(want) // 2:len(want) // 2 + 2]
    got = lm.generate_until([Req((context, {"until": [stop], "max_gen_toks": 6}))])
    assert got == [want.split(stop)[0]] and len(got[0]) < len(want)


def test_bad_input_fails_in_one_line(tiny, lm, tmp_path):
    model, tok = tiny
    with pytest.raises(HarpqError, match="loglikelihood request needs .args = a 2-tuple"):
        lm.loglikelihood([Req(("only a context",))])
    with pytest.raises(HarpqError, match="loglikelihood_rolling request needs"):
        lm.loglikelihood_rolling([("a bare tuple",)])
    with pytest.raises(HarpqError, match="encodes to no tokens"):
        lm.loglikelihood([Req(("context", ""))])
    with pytest.raises(HarpqError, match="greedily only"):
        lm.generate_until([Req(("x", {"do_sample": True}))])
    with pytest.raises(HarpqError, match="needs its tokenizer"):
        HarpqLM(model)
    with pytest.raises(HarpqError, match="no 'auto' batch size"):
        HarpqLM(model, tok, batch_size="auto")
    with pytest.raises(HarpqError, match="model path not found"):
        HarpqLM(tmp_path / "missing")


def test_loads_a_model_directory(tiny_path, tiny, lm):
    from_path = HarpqLM(str(tiny_path), device="cpu", batch_size="2", dtype="float32")
    assert from_path.batch_size == 2 and from_path.max_length == 2048
    req = [Req(("The quick brown fox", " jumps"))]
    assert from_path.loglikelihood(req)[0][0] == pytest.approx(lm.loglikelihood(req)[0][0], abs=1e-5)


@pytest.fixture
def fresh_class():
    lm_eval_model_class.cache_clear()
    yield
    lm_eval_model_class.cache_clear()


def block_lm_eval(monkeypatch, replacement=None):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry"):
        monkeypatch.setitem(sys.modules, name, None if replacement is None else replacement[name])


def test_without_lm_eval_the_lm_class_is_a_clear_error(monkeypatch, fresh_class, tiny):
    block_lm_eval(monkeypatch)
    with pytest.raises(HarpqError, match="lm_eval is not installed"):
        make_lm_eval_model(*tiny)


def test_with_lm_eval_the_adapter_is_a_registered_lm(monkeypatch, fresh_class, tiny, lm):
    class LM(abc.ABC):  # the parts of lm_eval.api.model.LM the adapter relies on
        def __init__(self):
            self._rank, self._world_size, self._device = 0, 1, None

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

    registry: dict[str, type] = {}

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, LM)
            registry.update(dict.fromkeys(names, cls))
            return cls
        return decorate

    mods = {n: types.ModuleType(n) for n in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry")}
    mods["lm_eval.api.model"].LM = LM
    mods["lm_eval.api.registry"].register_model = register_model
    block_lm_eval(monkeypatch, mods)
    wrapped = make_lm_eval_model(*tiny, batch_size=3, max_batch_size=64, device=None)
    assert isinstance(wrapped, LM) and registry == {"harpq": type(wrapped)} and lm_eval_model_class() is type(wrapped)
    assert wrapped._rank == 0 and wrapped.device == torch.device("cpu")
    req = [Req(("The quick brown fox", " jumps"))]
    assert wrapped.loglikelihood(req) == lm.loglikelihood(req)


def test_importing_harpq_does_not_import_lm_eval():
    code = ("import sys\n"
            "class Guard:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        assert name.split('.')[0] != 'lm_eval', 'lm_eval was imported'\n"
            "sys.meta_path.insert(0, Guard())\n"
            "import harpq, harpq.eval, harpq.eval.lm_eval_adapter\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
