"""LNQ attention-probability decode table: codes → unsigned fixed point (Q1.15), as held in on-chip ROM.

Entries are rhu(p̂_c·2^15) of the contract §1 LNQ decode, so 1.0 = 0x8000 fits 16 bits and the table is
within half an LSB (2^-16) of the float decode; with an ahcq export the table is built from its float32
`levels`, so it also sits within 2^-16 of the exported fake-quant probabilities p_ref.
"""
from __future__ import annotations

import numpy as np

from hw.model.decode import decode_lnq

LUT_FRAC = 15
LUT_BITS = 16


def lnq_table(levels: np.ndarray) -> np.ndarray:
    """Fixed-point table from decoded levels in [0, 1] (round half up, never half to even)."""
    levels = np.asarray(levels, dtype=np.float64)
    if levels.min() < 0.0 or levels.max() > 1.0 + 1e-6:
        raise ValueError(f"LNQ levels must lie in [0, 1], got [{levels.min()}, {levels.max()}]")
    return np.floor(np.minimum(levels, 1.0) * 2.0**LUT_FRAC + 0.5).astype(np.int64)


def lnq_table_from_params(clip: float, alpha: float, bits: int) -> np.ndarray:
    """Table for an LNQ quantizer given by its parameters."""
    return lnq_table(decode_lnq(np.arange(1 << bits), clip, alpha, bits))


def lnq_lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """What the ROM returns for a stream of codes."""
    return np.asarray(table)[np.asarray(codes, dtype=np.int64)]
