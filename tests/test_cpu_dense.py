"""The CPU path of a quantized linear: the weight decoded once, kept, and exactly the per-call decode."""

from __future__ import annotations

import pytest
import torch
from helpers import random_hessian

import harpq
from harpq.nn import quant_linear
from harpq.pipeline.linear import quantize_linear


def _module(method: str, bits: int):
    torch.manual_seed(0)
    recipe = harpq.Recipe.preset(method, bits=bits, harp_steps=3).for_module("m")
    return quantize_linear("m", torch.randn(48, 256) * 0.02, random_hessian(256, tokens=1024), recipe)[0]


@pytest.mark.parametrize("method,bits", [("rtn", 3), ("gptq", 4), ("hqq", 2), ("quip", 2), ("quipsharp", 2),
                                         ("quipsharp", 4), ("harp", 2)])
def test_dense_copy_matches_the_per_call_decode(monkeypatch, method, bits):
    module = _module(method, bits)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        monkeypatch.setattr(quant_linear, "DENSE_CACHE_SHARE", 0.0)
        per_call = module(x)
        assert not module._dense
        monkeypatch.setattr(quant_linear, "DENSE_CACHE_SHARE", 0.5)
        cached = module(x)
        assert module._dense
    torch.testing.assert_close(cached, per_call, rtol=1e-5, atol=1e-6)


def test_weight_is_decoded_once_and_again_after_the_codes_change(monkeypatch):
    module = _module("gptq", 4)
    calls = []
    original = module.effective_weight
    monkeypatch.setattr(module, "effective_weight", lambda: calls.append(1) or original())
    x = torch.randn(2, 256)
    with torch.no_grad():
        first = module(x)
        assert torch.equal(module(x), first) and len(calls) == 1
        name = next(k for k, v in module.named_buffers() if v.dtype in (torch.int32, torch.uint8, torch.int16))
        buf = getattr(module, name)
        buf.copy_(torch.roll(buf, 1, dims=0))  # an in-place change of the stored codes
        second = module(x)
    assert len(calls) == 2 and not torch.equal(second, first)


def test_memory_cap_falls_back_to_decoding_per_call_and_says_so(monkeypatch, caplog):
    module = _module("rtn", 4)
    monkeypatch.setattr(quant_linear, "DENSE_CACHE_SHARE", 0.0)
    monkeypatch.setitem(quant_linear._dense_cached, "said", False)
    with torch.no_grad(), caplog.at_level("WARNING", logger="harpq.nn.quant_linear"):
        module(torch.randn(2, 256))
    assert not module._dense and "decoding per call" in caplog.text
