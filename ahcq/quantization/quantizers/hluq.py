"""HLUQ: hybrid log-uniform quantizer for skewed activations (post-GELU input of MLP ``lin2``).

Values are shifted by ``x_min`` (running-average minimum). Below the breakpoint ``s1`` a power-of-two grid
holds ``n_log`` codes; above it ``L - n_log`` uniform steps of ``s2`` reach the running-average maximum.
Calibration scores every (range split ``r``, level split ``g``) candidate on each batch with
``s1 = r*R``, ``n_log = g*L``, ``s2 = (1-r)*R/(L-n_log)`` (``R = x_max - x_min``) by the error of the
*consumer's* output ``||f(x_hat) - f(x)||^2`` (``f`` = the next layer, from ``next_layer=`` in the call
context or ``set_next_layer``; the input itself when there is none). Losses add up over batches; the
argmin is applied at ``finalize``. ``s1`` and ``s2`` are Parameters created at construction and filled in
place, so optimizers built before calibration stay valid.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..observers import make_observer
from ..primitives import SCALE_EPS, dequantize_hluq, fake_quant_hluq, quantize_hluq
from .base import Quantizer, Role
from .search import consumer_error

__all__ = ["HLUQOptions", "HLUQuantizer"]

Consumer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HLUQOptions:
    """HLUQ's search candidates: fractions of the range below the breakpoint and of the codes on the log
    part (the ``hluq`` section's keys)."""

    range_splits: tuple[float, ...] = (0.1, 0.3, 0.5)
    level_splits: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)


class HLUQuantizer(Quantizer):
    """Per-tensor hybrid log-uniform quantizer with an output-aware initial grid search."""

    family = "hluq"
    options = HLUQOptions

    def __init__(
        self,
        role: Role = Role.INPUT,
        bits: int = 8,
        *,
        observer: str = "avg_minmax",
        range_splits: Sequence[float] = HLUQOptions.range_splits,
        level_splits: Sequence[float] = HLUQOptions.level_splits,
        next_layer: Consumer | None = None,
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        levels = 2**bits
        self.range_splits, self.level_splits = tuple(range_splits), tuple(level_splits)
        self.candidates: list[tuple[float, int]] = []
        for r in range_splits:
            if not 0.0 < r < 1.0:
                raise ValueError(f"quantizer {name!r}: range split {r} must be in (0, 1)")
            for g in level_splits:
                n_log = g * levels
                if not (float(n_log).is_integer() and 2 <= n_log <= levels - 1):
                    raise ValueError(f"quantizer {name!r}: level split {g} gives {n_log} log codes at {bits} "
                                     f"bits; need an integer in [2, {levels - 1}]")
                self.candidates.append((float(r), int(n_log)))
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
        self.losses.zero_()

    def split(
        self, x_min: torch.Tensor, x_max: torch.Tensor, r: float, n_log: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s1, s2)`` of candidate ``(r, n_log)`` for the range ``[x_min, x_max]``."""
        span = torch.clamp(x_max - x_min, min=SCALE_EPS)
        return r * span, (1.0 - r) * span / (2**self.bits - n_log)

    def observe(self, x: torch.Tensor, next_layer: Consumer | None = None, **ctx: Any) -> None:
        self.observer.observe(x)
        x_min, x_max = self.observer.range()
        consumer = next_layer if next_layer is not None else self.__dict__["_next_layer"]
        ref = x if consumer is None else consumer(x)
        for i, (r, n_log) in enumerate(self.candidates):
            s1, s2 = self.split(x_min, x_max, r, n_log)
            xq = fake_quant_hluq(x, x_min, s1, s2, n_log, self.bits)
            self.losses[i] += consumer_error(xq, ref, consumer)

    def compute_params(self) -> None:
        best = int(torch.argmin(self.losses))
        r, n_log = self.candidates[best]
        x_min, x_max = self.observer.range()
        s1, s2 = self.split(x_min, x_max, r, n_log)
        self.x_min.copy_(x_min)
        self.n_log.fill_(n_log)
        self.s1.data.copy_(s1)
        self.s2.data.copy_(s2)

    @property
    def choice(self) -> tuple[float, int]:
        """The chosen (range split, number of log codes)."""
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
