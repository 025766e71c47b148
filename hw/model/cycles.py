"""Cycle model of the tile engine; equals the RTL start→done and stall counters (tested).

The engine issues one beat (LANES channel pairs) per cycle and loops token → output → beat. A finished
dot product is handed to the requantizer, which spends one cycle per accumulator slot (one shared
multiplier), so the last beat of the next dot product waits until that is done: a stall of
max(0, slots − beats) cycles per dot product after the first. Fixed latency: one memory read, one
lane/accumulate stage, `slots` requant cycles, one output stage, one write.
"""
from __future__ import annotations

from dataclasses import dataclass

PIPELINE_CYCLES = 3


@dataclass(frozen=True)
class TileCycles:
    """Counters of one tile run."""

    cycles: int
    stalls: int
    beats: int


def tile_cycles(n_tok: int, n_out: int, n_beats: int, n_slots: int) -> TileCycles:
    """Cycles from start to done for a tile of n_tok × n_out dot products of n_beats beats each."""
    products = n_tok * n_out
    stalls = (products - 1) * max(0, n_slots - n_beats)
    beats = products * n_beats
    return TileCycles(beats + stalls + n_slots + PIPELINE_CYCLES, stalls, beats)


def beats_per_product(cin: int, lanes: int, group_sizes: list[int] | None = None) -> int:
    """Beats per dot product: each CAG group is padded to whole beats, one group means plain Cin/lanes."""
    sizes = group_sizes if group_sizes else [cin]
    return sum(-(-s // lanes) for s in sizes)
