"""Model families through the decode engine, exact against Hugging Face in float64; the rest refused;
mixture-of-experts models quantized expert by expert.

Tiny random configs built here (no download): Llama with llama3 rope scaling, Mistral with a sliding
window shorter than the prompt, Qwen2 (q/k/v biases, sliding layers from `max_window_layers`), Qwen3
(q/k RMSNorms per head), Qwen3-MoE (with a dense layer) and Mixtral (with a window); FP and
RTN-quantized. Gemma2, Phi3 and OLMo2 are refused in one line.
"""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import harpq
from harpq import HarpqError, Recipe
from harpq.engine import from_hf
from harpq.io.model import attention_windows

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "llama_rope_scaling": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                          "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32})),
    "mistral_window": ("mistral", dict(sliding_window=5, head_dim=16)),
    "qwen2_bias_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=16)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
}


def tiny(model_type, **extra):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    torch.manual_seed(0)
    moe = {"experts_implementation": "eager"} if "moe" in model_type or model_type == "mixtral" else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, **moe).eval()  # eager: float64
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so a missed norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def hf_last(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1].double()


@torch.no_grad()
def engine_matches(model, prompt=12, steps=4, atol=1e-9):
    ids = torch.randint(0, model.config.vocab_size, (2, prompt + steps), generator=torch.Generator().manual_seed(3))
    decoder = from_hf(model)
    decoder.setup_cache(2, prompt + steps + 1)
    got = decoder(ids[:, :prompt], torch.arange(prompt))
    assert (got - hf_last(model, ids[:, :prompt])).abs().max() < atol
    for t in range(prompt, prompt + steps):  # cached decode steps beyond the window
        got = decoder(ids[:, t:t + 1], torch.tensor([t]))
        assert (got - hf_last(model, ids[:, :t + 1])).abs().max() < atol, t


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp_model_through_the_engine_equals_hugging_face(family):
    model_type, extra = FAMILIES[family]
    engine_matches(tiny(model_type, **extra))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_model_through_the_engine_equals_hugging_face(family):
    model_type, extra = FAMILIES[family]
    model = tiny(model_type, **extra)
    harpq.quantize_model(model, Recipe.preset("rtn", bits=4, group_size=0), progress=False)
    model.double()
    engine_matches(model)


def test_windows_are_read_per_layer():
    qwen = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1).config
    assert attention_windows(qwen) == [None, 4, 4]
    assert attention_windows(tiny("mistral", sliding_window=5).config) == [5, 5, 5]
    assert attention_windows(tiny("llama").config) == [None, None, None]


REFUSED = {
    "gemma2": dict(head_dim=16),
    "phi3": dict(pad_token_id=0, eos_token_id=0, bos_token_id=0),
    "olmo2": dict(pad_token_id=0, eos_token_id=0, bos_token_id=0),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_other_families_are_refused_in_one_line(family, caplog):
    model = tiny(family, **REFUSED[family])
    with pytest.raises(HarpqError, match=family) as info:
        from_hf(model)
    assert "\n" not in str(info.value)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)} | {"[UNK]": 95}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]")
    with caplog.at_level(logging.WARNING):
        text = harpq.generate(model, "w1 w2 w3", max_new_tokens=3, tokenizer=tok, engine=True)
    assert isinstance(text, str) and f"not {family}" in caplog.text  # fell back to Hugging Face, said why


@torch.no_grad()
def test_calibration_gives_each_layer_its_own_attention_mask():
    """Layers 1 and 2 of this Qwen2 slide over 4 tokens, layer 0 does not: running the captured inputs through
    the layers with their captured kwargs reproduces the model's own hidden states."""
    from harpq.io.model import find_decoder_layers
    from harpq.pipeline.quantize import capture_layer_inputs, run_layer

    model = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1).float()
    tokens = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(5))
    _, layers = find_decoder_layers(model)
    x, kwargs = capture_layer_inputs(model, layers, tokens, torch.device("cpu"))
    want = model(tokens, output_hidden_states=True).hidden_states
    for i, layer in enumerate(layers):
        x = run_layer(layer, x, kwargs[i], batch=3)
        if i < len(layers) - 1:  # the last hidden state is after the final norm
            assert (x - want[i + 1]).abs().max() < 1e-5, i


def moe_model():
    return tiny("qwen3_moe", **FAMILIES["qwen3_moe"][1])


def test_the_routing_loop_is_transformers_own():
    from harpq.nn.quant_experts import routed_experts

    block = moe_model().model.layers[0].mlp
    x = torch.randn(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, weights, index = block.gate(x)
    ex = block.experts
    linear = torch.nn.functional.linear
    got = routed_experts(x, index, weights, ex.num_experts, lambda e, v: linear(v, ex.gate_up_proj[e]),
                         lambda e, v: linear(v, ex.down_proj[e]), ex.act_fn)
    assert torch.equal(got, ex(x, index, weights))


def _quantized_error(model, method, tokens, ids):
    with torch.no_grad():
        ref = model(ids).logits
    recipe = Recipe.preset(method, bits=4, **({"group_size": 0} if method != "quipsharp" else {}))
    specs = harpq.quantize_model(model, recipe, None if method == "rtn" else tokens, progress=False)
    with torch.no_grad():
        got = model(ids).logits
    return specs, float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["rtn", "gptq", "quipsharp"])
def test_every_expert_is_quantized_and_counted(method):
    import copy

    from harpq.eval.perplexity import bits_per_weight
    from harpq.nn import QuantExperts

    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(2))
    model = moe_model().float()
    original = copy.deepcopy(model)
    specs, err = _quantized_error(model, method, tokens, ids)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    assert len(experts) == 2 and all(e.num_experts == 6 for e in experts.values())  # layer 1 is dense
    assert sum(spec.get("kind") == "experts" for spec in specs.values()) == 2
    assert not any(p.dim() == 3 for p in model.parameters())  # no expert left in floating point
    assert 4 < bits_per_weight(model) < 4.6
    # the quantized experts compute exactly what transformers' experts do with the decoded weights
    with torch.no_grad():
        for name, q in experts.items():
            fp = original.get_submodule(name)
            fp.gate_up_proj.copy_(torch.stack([m.effective_weight() for m in q.gate_up]))
            fp.down_proj.copy_(torch.stack([m.effective_weight() for m in q.down]))
        for name, m in model.named_modules():
            if hasattr(m, "effective_weight") and name.split(".experts.")[0] + ".experts" not in experts:
                original.get_submodule(name).weight.copy_(m.effective_weight())
        assert torch.allclose(original(ids).logits, model(ids).logits, atol=1e-4)
    dense = tiny("qwen3", head_dim=16).float()  # as close to FP as a dense model of the same size
    assert err < 2 * _quantized_error(dense, method, tokens, ids)[1] + 0.02


@pytest.mark.parametrize("method", ["rtn", "gptq"])  # the streamed and the layer-wise path, saved and loaded
def test_quantized_moe_checkpoint_round_trip(method, tmp_path):
    from conftest import CALIB  # noqa: F401

    model = moe_model().float()
    src = tmp_path / "moe"
    model.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(src)
    out = harpq.quantize(src, tmp_path / "q", Recipe.preset(method, bits=4, group_size=0),
                         calib=text if method == "gptq" else None, nsamples=8, seqlen=32, progress=False)
    loaded = harpq.load(out)
    via_hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, ref = loaded(ids).logits, via_hf(ids).logits, model(ids).logits
    assert torch.equal(a, b) and (a - ref).norm() / ref.norm() < 0.3  # tiny random model: see the dense bound
    engine_matches(harpq.load(out, dtype=torch.float64))


def test_a_linear_without_calibration_input_is_still_quantized(caplog):
    """Experts as separate nn.Linears (older layouts) can get no routed token: identity Hessian, said once."""
    from harpq.nn import QuantLinear

    model = tiny("llama").float()
    layer = model.model.layers[0]
    layer.mlp.unused = torch.nn.Linear(64, 64)  # never called in the forward pass
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        harpq.quantize_model(model, Recipe.preset("gptq", bits=4, group_size=0), tokens, progress=False)
    assert isinstance(layer.mlp.unused, QuantLinear) and "saw no calibration input" in caplog.text
