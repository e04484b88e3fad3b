"""Run-time modules."""

from .quant_experts import QuantExperts
from .quant_linear import QuantLinear

__all__ = ["QuantExperts", "QuantLinear"]
