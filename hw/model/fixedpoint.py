"""Integer fixed-point helpers shared by the golden model: the RTL implements exactly these operations."""
from __future__ import annotations

import math

import numpy as np


def rshift_round_half_up(v, shift):
    """floor(v / 2**shift + 1/2) for Python ints or object arrays; shift 0 leaves v unchanged.

    This is the only rounding the datapath uses (never half-to-even): add half an LSB, then shift
    arithmetically, which is one adder and one shifter in hardware.
    """
    return (v + ((1 << shift) >> 1)) >> shift


def mantissa_shift(ratio: float, mant_bits: int) -> tuple[int, int]:
    """Write a positive ratio as mant * 2**-shift with mant in [2**(mant_bits-1), 2**mant_bits).

    The shift may be negative for ratios above 2**(mant_bits-1); callers check the range they need.
    """
    if not (ratio > 0.0 and math.isfinite(ratio)):
        raise ValueError(f"fixed-point ratio must be finite and > 0, got {ratio!r}")
    exp = math.floor(math.log2(ratio))
    shift = mant_bits - 1 - exp
    mant = math.floor(ratio * 2.0**shift + 0.5)
    if mant >= 1 << mant_bits:
        mant >>= 1
        shift -= 1
    return int(mant), int(shift)


def round_half_up_int(value: float) -> int:
    """Nearest integer of a float, ties up: used only for offline constants such as the folded bias."""
    return int(math.floor(value + 0.5))


def check_signed_range(name: str, values: np.ndarray, bits: int) -> None:
    """Raise if any integer does not fit a two's-complement register of `bits` bits."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vmin, vmax = int(np.min(values)), int(np.max(values))
    if vmin < lo or vmax > hi:
        raise ValueError(f"{name} needs more than {bits} bits: range [{vmin}, {vmax}]")
