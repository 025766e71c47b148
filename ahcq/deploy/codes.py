"""Integer codes packed at their bit width: ``8 // bits`` codes a byte for 2, 4 and 8 bits, a little-endian
bit stream for the others (3, 5, 6, 7), so a 4-bit weight costs half a byte."""
from __future__ import annotations

import numpy as np

__all__ = ["pack_codes", "packed_bytes", "unpack_codes"]


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """``codes`` (integers in ``[qmin, qmin + 2**bits)``) as a uint8 array of ``packed_bytes`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits must be in 1..8, got {bits}")
    shifted = np.asarray(codes, dtype=np.int64).reshape(-1) - qmin
    if shifted.size and (shifted.min() < 0 or shifted.max() >= 2**bits):
        raise ValueError(f"pack_codes: codes outside [{qmin}, {qmin + 2**bits - 1}] "
                         f"cannot take {bits} bits")
    stream = np.unpackbits(shifted.astype(np.uint8)[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, qmin: int, count: int) -> np.ndarray:
    """The ``count`` int32 codes that ``pack_codes`` stored in ``packed``."""
    if packed.dtype != np.uint8 or packed.size != packed_bytes(count, bits):
        need = packed_bytes(count, bits)
        raise ValueError(f"unpack_codes: {count} codes of {bits} bits need {need} bytes, "
                         f"got {packed.size} ({packed.dtype})")
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    values = np.packbits(stream, axis=1, bitorder="little")[:, 0]
    return values.astype(np.int32) + np.int32(qmin)
