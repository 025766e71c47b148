"""HLUQ: hybrid log-uniform quantizer for skewed activations (post-GELU input of MLP ``lin2``).

Values are shifted by the anchor ``x_min``. Below the breakpoint ``s1`` a power-of-two grid holds ``n_log``
codes; above it ``L - n_log`` uniform steps of ``s2`` reach the top of the range.

Calibration scores candidates on each batch by the error of the *consumer's* output
``||f(x_hat) - f(x)||^2`` (``f`` = the next layer, from ``next_layer=`` in the call context or
``set_next_layer``; the input itself when there is none); losses add up over batches and the argmin is
applied at ``finalize``. The candidates:

- the paper's split: every (range split ``r``, level split ``g``, top clip ``c``) with ``R = c*(x_max -
  x_min)`` (running-average range), anchor ``x_min``, ``s1 = r*R``, ``n_log = g*L``,
  ``s2 = (1-r)*R/(L-n_log)``. With ``clips = (1,)`` this is the reference's search; smaller clips give up
  the rare largest values for finer steps;
- with ``uniform_candidate``, uniform grids as degenerate HLUQs (``n_log = 2``): the grid of an MSE range
  search (``uniform_observer``), and the grids of windows ``f*[min(x_min, 0), max(x_max, 0)]`` for every
  clip ``f``, so the window is searched by the consumer's error too. HLUQ's code 0 is its anchor, so a
  uniform grid (lowest level ``lo``, step ``s``) is placed one of three ways (``Placement``): code 1 at
  ``lo`` and code 0 below every observed value (``s1 = t >= (lo - x_min)/(1 - 2**-0.5)``, ``s2 = s``), where
  every value rounds exactly as on the uniform grid, which loses its top level; the MSE grid also with
  code 0 at ``lo`` (``s1 = s2 = s``: every level kept, the first step rounded in the log domain), and
  stretched over ``L - 1`` levels from ``lo`` to its top. At high bit widths, where a log region only
  coarsens the grid, HLUQ thus falls back to about what a uniform quantizer does instead of losing to it.

``s1`` and ``s2`` are Parameters created at construction and filled in place, so optimizers built before
calibration stay valid.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..observers import make_observer
from ..primitives import (
    SCALE_EPS,
    dequantize_hluq,
    fake_quant_hluq,
    qparams_from_minmax,
    qrange,
    quantize_hluq,
)
from .base import Quantizer, Role
from .search import consumer_error

__all__ = ["DEFAULT_CLIPS", "Candidate", "HLUQOptions", "HLUQuantizer", "Placement"]

Consumer = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4)


@dataclass(frozen=True)
class HLUQOptions:
    """HLUQ's search (the ``hluq`` section's keys). The defaults here are ours (clip search, finer
    breakpoints, the uniform fallback); the config's defaults are the reference's (``(0.1, 0.3, 0.5)``,
    no clip, no fallback)."""

    range_splits: tuple[float, ...] = (0.02, 0.05, 0.1, 0.3)
    level_splits: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
    clips: tuple[float, ...] = DEFAULT_CLIPS
    uniform_candidate: bool = True


class Placement(enum.Enum):
    """How a uniform grid sits on HLUQ's codes (code 0 is the anchor)."""

    TOP_DROPPED = "top_dropped"  # code 1 at the lowest level, code 0 below the data: exact rounding
    ANCHORED = "anchored"  # code 0 at the lowest level: every level, the first step log-rounded
    STRETCHED = "stretched"  # L - 1 levels from the lowest level to the top, code 0 below the data


class Candidate(NamedTuple):
    """One searched grid. ``r`` set: the paper's split with ``n_log`` log codes and the top at fraction
    ``clip`` of the range. ``r`` None: a uniform grid placed as ``placement`` says, from the window at
    fraction ``clip`` of the min-max range or, with ``clip`` None, from the MSE search."""

    r: float | None
    n_log: int
    clip: float | None = 1.0
    placement: Placement | None = None


_CODE1_REACH = 1.0 - 2.0**-0.5  # code 1 takes every u >= s1/sqrt(2): down to (1 - 1/sqrt(2))*s1 below it


class HLUQuantizer(Quantizer):
    """Per-tensor hybrid log-uniform quantizer with an output-aware initial grid search."""

    family = "hluq"
    options = HLUQOptions
    calibration_state = ("losses",)

    def __init__(
        self,
        role: Role = Role.INPUT,
        bits: int = 8,
        *,
        observer: str = "avg_minmax",
        range_splits: Sequence[float] = HLUQOptions.range_splits,
        level_splits: Sequence[float] = HLUQOptions.level_splits,
        clips: Sequence[float] = HLUQOptions.clips,
        uniform_candidate: bool = HLUQOptions.uniform_candidate,
        uniform_observer: str = "avg_mse",
        next_layer: Consumer | None = None,
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        levels = 2**bits
        self.range_splits, self.level_splits = tuple(range_splits), tuple(level_splits)
        self.clips, self.uniform_candidate = tuple(clips), bool(uniform_candidate)
        if not self.clips or any(not 0.0 < c <= 1.0 for c in self.clips):
            raise ValueError(f"quantizer {name!r}: clips must be non-empty fractions in (0, 1], got {clips}")
        self.candidates: list[Candidate] = []
        for r in range_splits:
            if not 0.0 < r < 1.0:
                raise ValueError(f"quantizer {name!r}: range split {r} must be in (0, 1)")
            for g in level_splits:
                n_log = g * levels
                if not (float(n_log).is_integer() and 2 <= n_log <= levels - 1):
                    raise ValueError(f"quantizer {name!r}: level split {g} gives {n_log} log codes at {bits} "
                                     f"bits; need an integer in [2, {levels - 1}]")
                self.candidates += [Candidate(float(r), int(n_log), float(c)) for c in self.clips]
        if self.uniform_candidate:
            self.candidates += [Candidate(None, 2, None, p) for p in Placement]
            self.candidates += [Candidate(None, 2, float(c), Placement.TOP_DROPPED) for c in self.clips]
            self.uniform_observer = make_observer(uniform_observer, bits=bits, symmetric=False, axis=None,
                                                  name=name)
        self.observer = make_observer(observer, bits=bits, symmetric=False, axis=None, name=name)
        self.s1 = nn.Parameter(torch.ones(()))
        self.s2 = nn.Parameter(torch.ones(()))
        self.register_buffer("x_min", torch.zeros(()))
        self.register_buffer("n_log", torch.tensor(levels // 2, dtype=torch.int32))
        self.register_buffer("losses", torch.zeros(len(self.candidates), dtype=torch.float64))
        self.__dict__["_next_layer"] = next_layer

    def set_next_layer(self, fn: Consumer | None) -> None:
        """The consumer whose output error drives the grid search (kept out of the module tree)."""
        self.__dict__["_next_layer"] = fn

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.observer.reset()
        if self.uniform_candidate:
            self.uniform_observer.reset()
        self.losses.zero_()

    def split(
        self, x_min: torch.Tensor, x_max: torch.Tensor, r: float, n_log: int, clip: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s1, s2)`` of the split ``(r, n_log)`` with the top at ``x_min + clip*(x_max - x_min)``."""
        span = torch.clamp(clip * (x_max - x_min), min=SCALE_EPS)
        return r * span, (1.0 - r) * span / (2**self.bits - n_log)

    def grid(self, candidate: Candidate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(x_min, s1, s2, n_log)`` of ``candidate`` on the ranges observed so far."""
        x_min, x_max = self.observer.range()
        if candidate.r is not None:
            s1, s2 = self.split(x_min, x_max, candidate.r, candidate.n_log, candidate.clip)
            return x_min, s1, s2, candidate.n_log
        if candidate.clip is None:
            scale, zero_point = self.uniform_observer.qparams()
        else:
            lo, hi = torch.clamp(x_min, max=0.0), torch.clamp(x_max, min=0.0)
            scale, zero_point = qparams_from_minmax(candidate.clip * lo, candidate.clip * hi, self.bits,
                                                    symmetric=False)
        qmin, qmax = qrange(self.bits, False)
        lowest = (qmin - zero_point) * scale
        if candidate.placement is Placement.ANCHORED:
            return lowest, scale, scale, 2
        if candidate.placement is Placement.STRETCHED:
            scale = scale * (qmax - qmin) / (qmax - qmin - 1)
        reach = torch.clamp((lowest - x_min) / _CODE1_REACH, min=0.0)
        t = torch.maximum(scale, reach * (1.0 + 1e-3))
        return lowest - t, t, scale, 2

    def observe(self, x: torch.Tensor, next_layer: Consumer | None = None, **ctx: Any) -> None:
        self.observer.observe(x)
        if self.uniform_candidate:
            self.uniform_observer.observe(x)
        consumer = next_layer if next_layer is not None else self.__dict__["_next_layer"]
        ref = x if consumer is None else consumer(x)
        for i, candidate in enumerate(self.candidates):
            xq = fake_quant_hluq(x, *self.grid(candidate), self.bits)
            self.losses[i] += consumer_error(xq, ref, consumer)

    def compute_params(self) -> None:
        x_min, s1, s2, n_log = self.grid(self.choice)
        self.x_min.copy_(x_min)
        self.n_log.fill_(n_log)
        self.s1.data.copy_(s1)
        self.s2.data.copy_(s2)

    @property
    def choice(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[int(torch.argmin(self.losses))]

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        self.require_calibrated()
        s1, s2 = torch.clamp(self.s1, min=SCALE_EPS), torch.clamp(self.s2, min=SCALE_EPS)
        return self.x_min, s1, s2, int(self.n_log)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x_min, s1, s2, n_log = self._params()
        return fake_quant_hluq(x, x_min, s1, s2, n_log, self.bits, keep)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        x_min, s1, s2, n_log = self._params()
        return quantize_hluq(x.detach(), x_min, s1.detach(), s2.detach(), n_log, self.bits)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        x_min, s1, s2, n_log = self._params()
        return dequantize_hluq(codes, x_min, s1.detach(), s2.detach(), n_log, self.bits)

    def export(self) -> dict[str, np.ndarray]:
        x_min, s1, s2, n_log = self._params()
        return {
            "kind": np.array("hluq"),
            "bits": np.array(self.bits, dtype=np.int32),
            "x_min": np.array(float(x_min.detach()), dtype=np.float32),
            "s1": np.array(float(s1.detach()), dtype=np.float32),
            "s2": np.array(float(s2.detach()), dtype=np.float32),
            "n_log": np.array(n_log, dtype=np.int32),
        }
