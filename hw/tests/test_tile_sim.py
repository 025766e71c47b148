"""RTL tile engine vs the golden model, bit-exact, on Icarus and Verilator (random contract-format tiles)."""
from __future__ import annotations

import numpy as np
import pytest

from hw.model.golden import compile_layer
from hw.model.tiles import random_tile
from hw.tb.sim import HARNESS_LANES, SIMULATORS, run_tiles, unavailable_reason

# (kind, groups, x_bits, n_tok, cin, cout, o_bits): every bit width × group count, output quantized or
# fixed point, and shapes that exercise padding and requantizer stalls (HLUQ and CAG dot products with
# fewer beats than accumulator slots).
RANDOM_TILES = [
    ("uniform", 1, 4, 8, 40, 12, 8), ("uniform", 1, 6, 5, 64, 9, None), ("uniform", 1, 8, 6, 24, 7, 8),
    ("cag", 4, 4, 6, 64, 10, 8), ("cag", 4, 6, 4, 50, 8, None), ("cag", 4, 8, 7, 96, 6, 8),
    ("cag", 8, 4, 5, 72, 8, 8), ("cag", 8, 6, 3, 8, 11, 8), ("cag", 8, 8, 4, 128, 5, None),
    ("hluq", 1, 4, 9, 48, 8, 8), ("hluq", 1, 6, 4, 8, 13, None), ("hluq", 1, 8, 5, 80, 9, 8),
    ("hluq", 1, 4, 3, 16, 6, None), ("cag", 8, 4, 3, 4, 5, 8),
]


def random_programs(seed: int) -> list:
    rng = np.random.default_rng(seed)
    programs = []
    for kind, groups, bits, n_tok, cin, cout, o_bits in RANDOM_TILES:
        layer = random_tile(rng, kind, bits, groups, n_tok=n_tok, cin=cin, cout=cout, o_bits=o_bits)
        label = f"{kind} G={groups} {bits}-bit {n_tok}x{cin}x{cout} out={o_bits or 'fixed'}"
        programs.append((label, compile_layer(layer, HARNESS_LANES)))
    return programs


@pytest.mark.parametrize("sim", SIMULATORS)
def test_random_tiles_bit_exact(sim: str, tmp_path) -> None:
    reason = unavailable_reason(sim)
    if reason:
        pytest.skip(reason)
    run_tiles(sim, random_programs(seed=7), tmp_path)
