import pytest
import torch

from harpq.formats.packing import pack_bits, packed_words, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 32, 33, 344, 1376])
def test_pack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (7, n), generator=torch.Generator().manual_seed(bits * 1000 + n))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_words(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_is_bits_times_n_over_8_bytes(bits):
    codes = torch.zeros(3, 4096, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.numel() * 4 == 3 * bits * 4096 // 8


def test_pack_layout_is_little_endian_stream():
    # 4-bit codes 0..7 fill one word as nibbles, lowest code in the lowest bits
    codes = torch.arange(32).remainder(16)[None]
    words = pack_bits(codes, 4)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0x76543210


def test_pack_rejects_bad_width():
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_bits(torch.zeros(1, 32, dtype=torch.int64), 9)
