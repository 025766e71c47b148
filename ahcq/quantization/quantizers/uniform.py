"""Uniform affine quantizers: ``fixed`` (scale from the observer) and ``lsq`` (scale learned, LSQ).

Per tensor (``ch_axis=None``) or per channel (``ch_axis`` = the channel axis), on the shared
``GridQuantizer`` grid. The zero point is an int32 buffer and never learned. The LSQ gradient factor is
``1/sqrt(numel*qmax)`` per tensor and ``1/sqrt((numel/C)*qmax)`` per channel, ``numel`` being the size of
the current input.
"""
from __future__ import annotations

import math

import torch

from ..primitives import fake_quant_uniform, grad_scale
from .grid import GridQuantizer

__all__ = ["FixedQuantizer", "LSQQuantizer", "UniformQuantizer"]


class UniformQuantizer(GridQuantizer):
    """Uniform affine fake-quant of the input as it is; base of ``fixed``, ``lsq``, ``cag``."""

    family = "fixed"

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient factor for the current input."""
        per_scale = x.numel() / self.scale.numel()
        return 1.0 / math.sqrt(per_scale * self.qmax)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.require_calibrated()
        self.check_shape(x)
        scale, zero_point = self.channel_params()
        if self.learnable:
            scale = grad_scale(scale, self.grad_factor(x))
        return fake_quant_uniform(x, scale, zero_point, self.qmin, self.qmax, self.ch_axis, keep)


class FixedQuantizer(UniformQuantizer):
    """Uniform quantizer whose scale stays at the calibrated value."""

    family = "fixed"
    learnable = False


class LSQQuantizer(UniformQuantizer):
    """Uniform quantizer with a learnable scale (LSQ gradient scaling)."""

    family = "lsq"
    learnable = True
