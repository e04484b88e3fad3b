"""Model families through the decode engine, exact against Hugging Face in float64; the rest refused.

Tiny random configs built here (no download): Llama with llama3 rope scaling, Mistral with a sliding
window shorter than the prompt, Qwen2 (q/k/v biases, sliding layers from `max_window_layers`), Qwen3
(q/k RMSNorms per head); FP and RTN-quantized. Gemma2, Phi3 and OLMo2 are refused in one line.
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
}


def tiny(model_type, **extra):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
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
