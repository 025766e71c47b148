"""LNQ attention-probability decode table: golden tolerance and the RTL ROM on both simulators."""
from __future__ import annotations

import numpy as np
import pytest

from hw.model.decode import decode_lnq
from hw.model.lnq import LUT_FRAC, lnq_table, lnq_table_from_params
from hw.tb.sim import SIMULATORS, run_lnq, unavailable_reason

PARAMS = [(4, 0.3, 20.0), (6, 0.8, 5.0), (8, 1.0, 100.0)]


@pytest.mark.parametrize("bits,clip,alpha", PARAMS)
def test_table_within_half_lsb(bits: int, clip: float, alpha: float) -> None:
    table = lnq_table_from_params(clip, alpha, bits)
    levels = decode_lnq(np.arange(1 << bits), clip, alpha, bits)
    assert table.size == 1 << bits and table[0] == 0 and np.all(np.diff(table) >= 0)
    assert np.abs(table * 2.0**-LUT_FRAC - levels).max() <= 2.0 ** -(LUT_FRAC + 1)


def test_table_rounds_half_up() -> None:
    ties = np.array([0.5, 1.5, 2.0**LUT_FRAC]) * 2.0**-LUT_FRAC
    assert lnq_table(ties).tolist() == [1, 2, 1 << LUT_FRAC]
    with pytest.raises(ValueError):
        lnq_table(np.array([1.5]))


@pytest.mark.parametrize("sim", SIMULATORS)
def test_lnq_rom_bit_exact(sim: str, tmp_path) -> None:
    reason = unavailable_reason(sim)
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(11)
    cases = [(f"lnq {bits}-bit clip={clip} alpha={alpha}", lnq_table_from_params(clip, alpha, bits),
              rng.integers(0, 1 << bits, size=500)) for bits, clip, alpha in PARAMS]
    run_lnq(sim, cases, tmp_path)
