"""The quantization pipeline: calibration, Hessians, per-linear quantization, layer-wise driver."""

from .quantize import quantize, quantize_model

__all__ = ["quantize", "quantize_model"]
