"""The one Hadamard library: constructions of H_K and fast transforms for n = K·2^k."""

from .construct import hadamard_matrix, split_order
from .transform import fwht, hadamard_matrix_tensor, hadamard_transform, supports

__all__ = ["fwht", "hadamard_matrix", "hadamard_matrix_tensor", "hadamard_transform", "split_order", "supports"]
