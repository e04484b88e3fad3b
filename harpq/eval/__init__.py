"""Evaluation: perplexity, zero-shot tasks, bits per weight."""

from .perplexity import bits_per_weight, perplexity
from .zeroshot import TASKS, evaluate_tasks

__all__ = ["TASKS", "bits_per_weight", "evaluate_tasks", "perplexity"]
