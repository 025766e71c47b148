"""AdaRound weight quantizer: learned up/down rounding on a fixed per-channel grid.

The grid (scale, zero point) comes from the observer (MSE by default) and stays fixed. Each weight is
rounded down and then gets a rounding bit: soft ``h(V) = clamp(sigmoid(V)*(ZETA-GAMMA)+GAMMA, 0, 1)`` while
learning, hard ``1[V >= 0]`` after ``harden()``. ``V`` starts where the soft weights equal the float
weights. The hard output is the uniform fake-quant of ``s*(floor(w/s) + bit)``, computed by the primitive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..observers import make_observer
from ..primitives import dequantize_uniform, fake_quant_uniform, qrange, quantize_uniform, view_along
from .base import Quantizer, Role

__all__ = ["AdaRoundQuantizer", "BetaSchedule", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class BetaSchedule:
    """Temperature ``b`` of the rounding regulariser: ``b_start`` during the warm-up fraction of
    ``iters``, then linear down to ``b_end`` at ``iters``. ``active(t)``: whether the regulariser applies."""

    iters: int
    b_start: float = 20.0
    b_end: float = 2.0
    warm_up: float = 0.2

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"BetaSchedule: iters must be >= 1, got {self.iters}")
        if not 0.0 <= self.warm_up < 1.0:
            raise ValueError(f"BetaSchedule: warm_up must be in [0, 1), got {self.warm_up}")

    def active(self, t: int) -> bool:
        return t >= self.warm_up * self.iters

    def __call__(self, t: int) -> float:
        start = self.warm_up * self.iters
        if t < start:
            return self.b_start
        progress = min((t - start) / (self.iters - start), 1.0)
        return self.b_end + (self.b_start - self.b_end) * (1.0 - progress)


class AdaRoundQuantizer(Quantizer):
    """AdaRound on a per-output-channel (``ch_axis=0``) or per-tensor (``ch_axis=None``) grid."""

    family = "adaround"

    def __init__(
        self,
        role: Role = Role.WEIGHT,
        bits: int = 8,
        *,
        symmetric: bool = False,
        ch_axis: int | None = 0,
        observer: str = "mse",
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        self.symmetric = bool(symmetric)
        self.ch_axis = ch_axis
        self.qmin, self.qmax = qrange(bits, self.symmetric)
        self.observer = make_observer(observer, bits=bits, symmetric=self.symmetric, axis=ch_axis, name=name)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("hard", torch.tensor(False))
        self.alpha = nn.Parameter(torch.zeros(()))
        self._init_weight: torch.Tensor | None = None

    @property
    def is_hard(self) -> bool:
        return bool(self.hard)

    def harden(self) -> None:
        """Fix every rounding bit to ``1[V >= 0]``."""
        self.require_calibrated()
        self.hard.fill_(True)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.observer.reset()
        self._init_weight = None

    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        self.observer.observe(x)
        self._init_weight = x

    def compute_params(self) -> None:
        scale, zero_point = self.observer.qparams(self.bits, self.symmetric)
        self.scale = scale.detach().float().to(self.scale.device).clone()
        self.zero_point = zero_point.detach().round().to(self.zero_point.device, torch.int32)
        w = self._init_weight
        rest = w / self._view(self.scale, w) - torch.floor(w / self._view(self.scale, w))
        self.alpha.data = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0).to(self.alpha.device)
        self.hard.fill_(False)
        self._init_weight = None

    def _view(self, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return p if self.ch_axis is None else view_along(p, w, self.ch_axis)

    def rounding(self) -> torch.Tensor:
        """The rounding bits: soft ``h(V)`` in [0, 1], or hard ``1[V >= 0]`` once hardened."""
        if self.is_hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def regularizer(self, b: float) -> torch.Tensor:
        """``sum(1 - |2h(V) - 1|**b)``: pushes every soft rounding bit toward 0 or 1."""
        h = torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        return (1.0 - (2.0 * h - 1.0).abs().pow(b)).sum()

    def _check_weight(self, w: torch.Tensor) -> None:
        if w.shape != self.alpha.shape:
            raise ValueError(
                f"quantizer {self.name!r}: weight of shape {tuple(w.shape)} does not match the calibrated "
                f"shape {tuple(self.alpha.shape)}"
            )

    def grid_value(self, w: torch.Tensor) -> torch.Tensor:
        """``s*(floor(w/s) + hard bit)``: the value whose uniform fake-quant is the hardened weight."""
        scale = self._view(self.scale, w)
        return (torch.floor(w.detach() / scale) + (self.alpha.detach() >= 0).to(w.dtype)) * scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        self._check_weight(x)
        if self.is_hard:
            return fake_quant_uniform(self.grid_value(x), self.scale, self.zero_point, self.qmin, self.qmax,
                                      self.ch_axis)
        scale = self._view(self.scale, x)
        zero_point = self._view(self.zero_point, x).float()
        codes = torch.floor(x.detach() / scale) + self.rounding() + zero_point
        codes = torch.clamp(codes, self.qmin, self.qmax)
        return scale * (codes - zero_point)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        self._require_hard("quantize_int")
        self._check_weight(x)
        return quantize_uniform(self.grid_value(x), self.scale, self.zero_point, self.qmin, self.qmax,
                                self.ch_axis)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        return dequantize_uniform(codes, self.scale, self.zero_point, self.ch_axis)

    def _require_hard(self, what: str) -> None:
        self.require_calibrated()
        if not self.is_hard:
            raise RuntimeError(f"quantizer {self.name!r}: {what} needs hardened rounding; call harden()")

    def export(self) -> dict[str, np.ndarray]:
        self._require_hard("export")
        return {
            "kind": np.array("uniform"),
            "bits": np.array(self.bits, dtype=np.int32),
            "qmin": np.array(self.qmin, dtype=np.int32),
            "qmax": np.array(self.qmax, dtype=np.int32),
            "axis": np.array(-1 if self.ch_axis is None else self.ch_axis, dtype=np.int32),
            "per_channel": np.array(self.ch_axis is not None),
            "scale": self.scale.cpu().numpy().astype(np.float32).reshape(-1),
            "zero_point": self.zero_point.cpu().numpy().astype(np.int32).reshape(-1),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ch_axis={self.ch_axis}, hard={self.is_hard}"

