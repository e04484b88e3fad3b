"""Dense bit packing of b-bit integer codes into int32 words.

Every run of 32 codes becomes exactly b words (a little-endian bit stream), so a row of n codes takes
b * ceil(n / 32) words: b·n/8 bytes, any b from 1 to 8 (3-bit codes straddle word boundaries).
"""

from __future__ import annotations

import functools

import torch

_MASK32 = (1 << 32) - 1


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding n codes of `bits` bits."""
    return bits * ((n + 31) // 32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim into int32 words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1 to 8 bits per code, not {bits}")
    *lead, n = codes.shape
    chunks = (n + 31) // 32
    c = torch.zeros(*lead, chunks * 32, dtype=torch.int64, device=codes.device)
    c[..., :n] = codes.to(torch.int64)
    c = c.view(*lead, chunks, 32)
    words = torch.zeros(*lead, chunks, bits, dtype=torch.int64, device=codes.device)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[..., word] |= (c[..., i] << offset) & _MASK32
        if offset + bits > 32:
            words[..., word + 1] |= c[..., i] >> (32 - offset)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).reshape(*lead, chunks * bits)


@functools.cache
def _slot_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For each of the 32 codes of a run: its word, its bit offset, and the word holding its spill-over
    (int32 tensors on `device`, made once: a CUDA graph may not copy from the host)."""
    word = [i * bits // 32 for i in range(32)]
    offset = [i * bits % 32 for i in range(32)]
    spill = [w + 1 if o + bits > 32 else w for w, o in zip(word, offset, strict=True)]
    return tuple(torch.tensor(t, device=device, dtype=torch.int32) for t in (word, offset, spill))


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 words -> int32 codes, the last dim cut to n.

    Works in int32 throughout: the mask after each shift discards sign extension and overflow.
    """
    *lead, total = words.shape
    chunks = total // bits
    w = words.view(*lead, chunks, bits)
    word, offset, spill = _slot_layout(bits, words.device)
    low = (w[..., word.long()] >> offset) & ((1 << (32 - offset).clamp(max=bits)) - 1)  # drop sign extension
    high = torch.where(spill != word, w[..., spill.long()] << (32 - offset), 0)
    codes = (low | high) & ((1 << bits) - 1)
    return codes.reshape(*lead, chunks * 32)[..., :n]


def tile_chunk_words(bits: int) -> int:
    """Words of a row in one chunk of the row-tiled layout: 64 bytes (48 at 3 bits, whose runs of 32 codes
    take 3 words), the most one decode-kernel thread reads of a row at once."""
    return 12 if bits == 3 else 16


def to_row_tiles(words: torch.Tensor, tile: int, chunk: int) -> torch.Tensor:
    """Rows of packed words (m, w) -> the row-tiled layout, same shape: `tile` rows at a time, chunk-major
    inside a tile (each row's first `chunk` words, then their next `chunk`, ...; a shorter last chunk),
    so that the rows of a tile a kernel reads together lie in one contiguous stretch. m % tile == 0."""
    m, w = words.shape
    full = w // chunk * chunk
    head = words[:, :full].reshape(m // tile, tile, full // chunk, chunk).transpose(1, 2)
    tail = words[:, full:].reshape(m // tile, tile * (w - full))
    return torch.cat([head.reshape(m // tile, tile * full), tail], dim=1).view(m, w)


def from_row_tiles(words: torch.Tensor, tile: int, chunk: int) -> torch.Tensor:
    """Inverse of `to_row_tiles`."""
    m, w = words.shape
    full = w // chunk * chunk
    t = words.reshape(m // tile, tile * w)
    head = t[:, : tile * full].reshape(m // tile, full // chunk, tile, chunk).transpose(1, 2)
    tail = t[:, tile * full:].reshape(m // tile, tile, w - full)
    return torch.cat([head.reshape(m // tile, tile, full), tail], dim=2).reshape(m, w)
