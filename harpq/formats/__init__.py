"""Storage formats: the stored tensors of a quantized matrix, their decode, and what kernels read."""

from .base import BufferSpec, StorageFormat, stored_bits
from .e8p import E8PStages
from .scalar import ScalarGroups
from .trellis import TrellisTiles

__all__ = ["BufferSpec", "E8PStages", "ScalarGroups", "StorageFormat", "TrellisTiles", "stored_bits"]
