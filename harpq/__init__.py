"""harpq: 2-4 bit weight quantization for Hugging Face causal LMs.

    import harpq
    harpq.quantize("llama-small", "out", harpq.Recipe.preset("gptq", bits=4), calib="calib.txt")
    model = harpq.load("out")            # or AutoModelForCausalLM.from_pretrained("out")
    harpq.evaluate(model, ppl=["test.txt"], tokenizer=...)

The names below load on first use, so `import harpq` (and the CLI's --help) stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

from .io.hf_hook import register_with_transformers

__version__ = "0.1.0"

register_with_transformers()

_WHERE = {
    "evaluate": ".api", "generate": ".api", "load": ".api", "quantize": ".api", "quantize_model": ".api",
    "HarpqError": ".errors", "METHODS": ".recipe", "LayerRecipe": ".recipe", "Recipe": ".recipe",
}

__all__ = [
    "METHODS", "HarpqError", "LayerRecipe", "Recipe", "evaluate", "generate", "load", "quantize", "quantize_model",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harpq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
