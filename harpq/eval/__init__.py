"""Evaluation: perplexity (zero-shot tasks plug in here too)."""

from .perplexity import bits_per_weight, perplexity

__all__ = ["bits_per_weight", "perplexity"]
