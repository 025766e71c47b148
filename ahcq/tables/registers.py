"""Quantization-parameter register counts per activation granularity, from a SAM's structure alone.

The AHCPTQ supplement (Sec. B) prices granularities by the on-chip registers that hold each quantizer's
(scale, zero point) pairs. We count over the CAG-eligible activation quantizers (the ``cag`` rows of the SAM
role map: encoder qkv / MLP lin1 inputs, decoder q/k/v_proj / MLP lin1 inputs), reading each one's channel
count from the Linear it feeds: per-tensor keeps 1 pair, per-channel C pairs, CAG with G groups min(G, C)
pairs. Register widths: an FP32 scale and a b-bit zero point, so one pair is ``32 + b`` bits (4 groups at
4 bits: 4 x 36 = 144). The model may live on the meta device, so SAM-H needs no weights and no memory.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ahcq.models.sam import DEFAULT_KEEP_FLOAT, float_patterns, is_kept_float
from ahcq.models.sam_roles import SAM_ROLE_TABLE
from ahcq.quantization.recipe import Feature

__all__ = ["SCALE_BITS", "Granularity", "RegisterCount", "build_meta_sam", "cag_sites", "count_registers"]

SCALE_BITS = 32


@dataclass(frozen=True)
class RegisterCount:
    """Registers of one granularity: (scale, zero point) pairs, values (2 per pair) and bits."""

    granularity: str
    pairs: int
    bits_per_pair: int

    @property
    def registers(self) -> int:
        return 2 * self.pairs

    @property
    def bits(self) -> int:
        return self.pairs * self.bits_per_pair


@dataclass(frozen=True)
class Granularity:
    """``groups`` None = per-channel, 0 = per-tensor, G > 0 = CAG with G groups."""

    label: str
    groups: int | None


def cag_sites(sam: nn.Module, quant_encoder: bool = True) -> list[tuple[str, int]]:
    """``(name, channels)`` of every Linear whose input quantizer the role map makes CAG."""
    patterns = [r.pattern for r in SAM_ROLE_TABLE if r.kind is Feature.CAG and r.slot == "input"]
    keep = float_patterns(quant_encoder, DEFAULT_KEEP_FLOAT)
    return [
        (name, module.in_features)
        for name, module in sam.named_modules()
        if isinstance(module, nn.Linear) and not is_kept_float(name, keep)
        and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def count_registers(sites: list[tuple[str, int]], granularities: list[Granularity], bits: int,
                    scale_bits: int = SCALE_BITS) -> list[RegisterCount]:
    """One count per granularity over ``sites``; a pair = a ``scale_bits`` scale + a ``bits`` zero point."""
    out = []
    for g in granularities:
        if g.groups is None:
            pairs = sum(c for _, c in sites)
        elif g.groups == 0:
            pairs = len(sites)
        else:
            pairs = sum(min(g.groups, c) for _, c in sites)
        out.append(RegisterCount(g.label, pairs, scale_bits + bits))
    return out


def build_meta_sam(arch: str, sizes: dict[str, Any] | None = None) -> nn.Module:
    """An official SAM (``vit_b``/``vit_l``/``vit_h``) or the tiny SAM on the meta device (no weights)."""
    from segment_anything import sam_model_registry

    from ahcq.models.tiny_sam import build_tiny_sam

    with torch.device("meta"):
        if arch == "tiny":
            return build_tiny_sam(**(sizes or {}))
        if arch not in sam_model_registry or arch == "default":
            raise ValueError(f"unknown SAM arch {arch!r}; expected tiny, vit_b, vit_l or vit_h")
        if sizes:
            raise ValueError(f"sizes apply to the tiny SAM only, not {arch!r}")
        return sam_model_registry[arch]()
