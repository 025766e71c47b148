"""Uniform affine quantizers: ``fixed`` (scale from the observer) and ``lsq`` (scale learned, LSQ).

Per tensor (``ch_axis=None``) or per channel (``ch_axis`` = the channel axis). The zero point is an int32
buffer and never learned. The LSQ gradient factor is ``1/sqrt(numel*qmax)`` per tensor and
``1/sqrt((numel/C)*qmax)`` per channel, ``numel`` being the size of the current input.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..observers import make_observer
from ..primitives import (
    SCALE_EPS,
    dequantize_uniform,
    fake_quant_uniform,
    grad_scale,
    qrange,
    quantize_uniform,
)
from .base import Quantizer, Role

__all__ = ["FixedQuantizer", "LSQQuantizer", "UniformQuantizer"]


class UniformQuantizer(Quantizer):
    """Uniform affine fake-quant, range from a registry observer; base of ``fixed``, ``lsq``, ``cag``."""

    family = "fixed"
    learnable = False

    def __init__(
        self,
        role: Role,
        bits: int,
        *,
        symmetric: bool = False,
        ch_axis: int | None = None,
        observer: str = "avg_minmax",
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        self.symmetric = bool(symmetric)
        self.ch_axis = ch_axis
        self.qmin, self.qmax = qrange(bits, self.symmetric)
        self.observer = make_observer(observer, bits=bits, symmetric=self.symmetric, axis=ch_axis, name=name)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=self.learnable)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.observer.reset()

    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        self.observer.observe(x)

    def compute_params(self) -> None:
        scale, zero_point = self.observer.qparams(self.bits, self.symmetric)
        self.scale.data = scale.detach().to(self.scale.device, torch.float32).clone()
        self.zero_point = zero_point.detach().round().to(self.zero_point.device, torch.int32)

    def effective_scale(self) -> torch.Tensor:
        """The scale used on the grid: the parameter kept positive (a learned scale may cross zero)."""
        return torch.clamp(self.scale, min=SCALE_EPS)

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient factor for the current input."""
        per_scale = x.numel() / self.scale.numel()
        return 1.0 / math.sqrt(per_scale * self.qmax)

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as laid out on the channel axis; CAG expands its groups here."""
        return self.effective_scale(), self.zero_point

    def _check_shape(self, x: torch.Tensor) -> None:
        if self.ch_axis is None:
            return
        if not -x.dim() <= self.ch_axis < x.dim() or x.shape[self.ch_axis] != self.zero_point.numel():
            raise ValueError(
                f"quantizer {self.name!r}: input of shape {tuple(x.shape)} does not have "
                f"{self.zero_point.numel()} channels on axis {self.ch_axis}"
            )

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.require_calibrated()
        self._check_shape(x)
        scale, zero_point = self.channel_params()
        if self.learnable:
            scale = grad_scale(scale, self.grad_factor(x))
        return fake_quant_uniform(x, scale, zero_point, self.qmin, self.qmax, self.ch_axis, keep)

    def fake_quant_drop(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x, keep)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        self._check_shape(x)
        scale, zero_point = self.channel_params()
        return quantize_uniform(x.detach(), scale.detach(), zero_point, self.qmin, self.qmax, self.ch_axis)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        scale, zero_point = self.channel_params()
        return dequantize_uniform(codes, scale.detach(), zero_point, self.ch_axis)

    def export(self) -> dict[str, np.ndarray]:
        self.require_calibrated()
        scale, zero_point = self.channel_params()
        return {
            "kind": np.array("uniform"),
            "bits": np.array(self.bits, dtype=np.int32),
            "qmin": np.array(self.qmin, dtype=np.int32),
            "qmax": np.array(self.qmax, dtype=np.int32),
            "axis": np.array(-1 if self.ch_axis is None else self.ch_axis, dtype=np.int32),
            "per_channel": np.array(self.ch_axis is not None),
            "scale": scale.detach().cpu().float().numpy().reshape(-1),
            "zero_point": zero_point.cpu().numpy().astype(np.int32).reshape(-1),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, symmetric={self.symmetric}, ch_axis={self.ch_axis}"


class FixedQuantizer(UniformQuantizer):
    """Uniform quantizer whose scale stays at the calibrated value."""

    family = "fixed"
    learnable = False


class LSQQuantizer(UniformQuantizer):
    """Uniform quantizer with a learnable scale (LSQ gradient scaling)."""

    family = "lsq"
    learnable = True
