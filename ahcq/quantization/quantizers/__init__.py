"""Quantizer families, registered by the canonical names used in configs (``QUANTIZERS``)."""
from __future__ import annotations

from .adaround import AdaRoundQuantizer, BetaSchedule
from .agq import AGQOptions, AGQuantizer
from .base import Mode, Quantizer, Role
from .cag import CAGOptions, CAGQuantizer, progressive_schedule
from .grid import GridQuantizer
from .hluq import HLUQOptions, HLUQuantizer
from .lnq import LNQOptions, LNQuantizer
from .probability import ProbabilityQuantizer
from .uniform import FixedQuantizer, LSQQuantizer, UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "AGQOptions",
    "AGQuantizer",
    "AdaRoundQuantizer",
    "BetaSchedule",
    "CAGOptions",
    "CAGQuantizer",
    "FixedQuantizer",
    "GridQuantizer",
    "HLUQOptions",
    "HLUQuantizer",
    "LNQOptions",
    "LNQuantizer",
    "LSQQuantizer",
    "Mode",
    "ProbabilityQuantizer",
    "Quantizer",
    "Role",
    "UniformQuantizer",
    "make_quantizer",
    "progressive_schedule",
]

QUANTIZERS: dict[str, type[Quantizer]] = {
    "lsq": LSQQuantizer,
    "fixed": FixedQuantizer,
    "adaround": AdaRoundQuantizer,
    "hluq": HLUQuantizer,
    "lnq": LNQuantizer,
    "agq": AGQuantizer,
    "cag": CAGQuantizer,
}


def make_quantizer(kind: str, role: Role, bits: int, **kwargs) -> Quantizer:
    """Build the quantizer registered as ``kind``; ``kwargs`` are that family's keyword arguments."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {kind!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind](role, bits, **kwargs)
