"""harpq: 2-4 bit weight quantization for Hugging Face causal LMs.

    import harpq
    harpq.quantize("llama-small", "out", harpq.Recipe.preset("gptq", bits=4), calib="calib.txt")
    model = harpq.load("out")            # or AutoModelForCausalLM.from_pretrained("out")
    harpq.evaluate(model, ppl=["test.txt"], tokenizer=...)
"""

__version__ = "0.1.0"

from .io.hf_integration import register as _register_with_transformers

_register_with_transformers()

from .api import evaluate, generate, load, quantize, quantize_model  # noqa: E402
from .errors import HarpqError  # noqa: E402
from .recipe import METHODS, LayerRecipe, Recipe  # noqa: E402

__all__ = [
    "METHODS", "HarpqError", "LayerRecipe", "Recipe", "evaluate", "generate", "load", "quantize", "quantize_model",
]
