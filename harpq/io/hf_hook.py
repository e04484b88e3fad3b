"""Registering harpq with transformers without importing transformers.

`import harpq` must make `AutoModelForCausalLM.from_pretrained(harpq_checkpoint)` work, but importing
transformers' quantizer registry costs about a second, which every `harpq --help` would pay. So the
registration runs right after transformers loads that registry, whenever that happens (at once if it
already has).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    integration = sys.modules.get(f"{__package__}.hf_integration")
    if integration is not None and not hasattr(integration, "register"):
        return  # it is importing the registry itself right now, and registers when it is done
    from .hf_integration import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' registry with the other finders, then runs `_register` after it executes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once: let the regular finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            execute(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_transformers() -> None:
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
