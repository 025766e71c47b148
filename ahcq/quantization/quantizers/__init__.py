"""Quantizer families, registered by the canonical names used in configs (``QUANTIZERS``)."""
from __future__ import annotations

from .adaround import AdaRoundQuantizer, BetaSchedule
from .agq import AGQuantizer
from .base import Mode, Quantizer, Role
from .cag import CAGQuantizer, progressive_schedule
from .hluq import HLUQuantizer
from .lnq import LNQuantizer
from .uniform import FixedQuantizer, LSQQuantizer, UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "AGQuantizer",
    "AdaRoundQuantizer",
    "BetaSchedule",
    "CAGQuantizer",
    "FixedQuantizer",
    "HLUQuantizer",
    "LNQuantizer",
    "LSQQuantizer",
    "Mode",
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
