"""Granularity of a quantizer's grid, as types: one grid per tensor, one per channel along an axis, or
channels sharing a few grids (CAG).

The reference configs write granularity as ``ch_axis`` with ``-1`` meaning per tensor, while a tensor axis
``-1`` means the last axis; ``from_ch_axis`` is the one place that reads that convention, so nothing past
the config layer has to know which meaning a ``-1`` had.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChannelGroups", "Granularity", "PerChannel", "PerTensor", "from_ch_axis"]


@dataclass(frozen=True)
class PerTensor:
    """One (scale, zero point) for the whole tensor."""

    def __str__(self) -> str:
        return "per tensor"


@dataclass(frozen=True)
class PerChannel:
    """One grid per channel along ``axis`` (weights: 0 is the output channel)."""

    axis: int

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"PerChannel: axis must be an int, got {self.axis!r}")

    def __str__(self) -> str:
        return f"per channel on axis {self.axis}"


@dataclass(frozen=True)
class ChannelGroups:
    """The last axis's channels share ``groups`` grids (CAG); ``None``: per channel until merged."""

    groups: int | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and (isinstance(self.groups, bool) or not isinstance(self.groups, int)
                                        or self.groups < 1):
            raise ValueError(f"ChannelGroups: groups must be a positive int or None, got {self.groups!r}")

    def __str__(self) -> str:
        return f"{self.groups} channel groups" if self.groups is not None else "channel groups"


Granularity = PerTensor | PerChannel | ChannelGroups


def from_ch_axis(ch_axis: int) -> PerTensor | PerChannel:
    """The granularity a reference config's ``ch_axis`` means: ``-1`` per tensor, ``k >= 0`` per channel
    on axis ``k``."""
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, int) or ch_axis < -1:
        raise ValueError(f"ch_axis must be -1 (per tensor) or an axis >= 0, got {ch_axis!r}")
    return PerTensor() if ch_axis == -1 else PerChannel(ch_axis)
