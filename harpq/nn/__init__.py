"""Run-time modules."""

from .quant_experts import QuantExperts
from .quant_linear import QuantLinear
from .shared_input import SharedInput

__all__ = ["QuantExperts", "QuantLinear", "SharedInput"]
