"""Run-time modules."""

from .quant_experts import QuantExperts
from .quant_linear import QuantLinear
from .shared_input import SharedInput, tie_input_sides

__all__ = ["QuantExperts", "QuantLinear", "SharedInput", "tie_input_sides"]
