"""The uniform affine grid that the uniform, LSQ, CAG and AdaRound quantizers share.

A ``GridQuantizer`` owns the grid: bit width, symmetry, the channel axis (``None``: per tensor), the
observer that calibrates it, and the (scale, zero point) tensors. Families differ only in what they put on
the grid: the input as it is (uniform, LSQ, CAG), or the weight with learned rounding (AdaRound,
``grid_input``), and in how channels map to grids (CAG's groups, ``channel_params``). Integer codes,
their decoding, the export record and weight grouping are therefore written once, here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..granularity import Granularity, PerChannel, PerTensor
from ..observers import make_observer
from ..primitives import SCALE_EPS, dequantize_uniform, qrange, quantize_uniform, view_along
from .base import Quantizer, Role

__all__ = ["GridQuantizer"]


class GridQuantizer(Quantizer):
    """A quantizer on one uniform affine grid per tensor or per channel (``ch_axis``), set by its observer.

    ``scale_parameter``: the scale is an ``nn.Parameter`` (learned when ``learnable``), else a buffer.
    """

    granularities = (PerTensor, PerChannel)
    symmetric_ok = True
    learnable = False
    scale_parameter = True

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
        if self.scale_parameter:
            self.scale = nn.Parameter(torch.ones(()), requires_grad=self.learnable)
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    @property
    def granularity(self) -> Granularity:
        return PerTensor() if self.ch_axis is None else PerChannel(self.ch_axis)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.observer.reset()

    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        self.observer.observe(x)

    def compute_params(self) -> None:
        scale, zero_point = self.observer.qparams(self.bits, self.symmetric)
        self.set_grid(scale, zero_point)

    @torch.no_grad()
    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Replace (scale, zero point) by new tensors (new storage: caches keyed on the grid see it)."""
        self.scale.data = scale.detach().to(self.scale.device, torch.float32).clone()
        self.zero_point = zero_point.detach().round().to(self.zero_point.device, torch.int32)
        self.clear_cache()

    def grid_changed(self, weight: torch.Tensor) -> None:
        """Called after the grid was rewritten in place for a weight (weight grouping); families whose state
        depends on the grid (AdaRound's rounding) re-derive it from ``weight``."""
        self.clear_cache()

    def effective_scale(self) -> torch.Tensor:
        """The scale used on the grid: the parameter kept positive (a learned scale may cross zero)."""
        return torch.clamp(self.scale, min=SCALE_EPS)

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as laid out on the channel axis; CAG expands its groups here."""
        return self.effective_scale(), self.zero_point

    def along(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel parameter viewed to broadcast against ``x`` (per tensor: as it is)."""
        return p if self.ch_axis is None else view_along(p, x, self.ch_axis)

    def check_shape(self, x: torch.Tensor) -> None:
        """Raise naming this quantizer when ``x`` lacks the calibrated channels on the channel axis."""
        if self.ch_axis is None:
            return
        if not -x.dim() <= self.ch_axis < x.dim() or x.shape[self.ch_axis] != self.zero_point.numel():
            raise ValueError(
                f"quantizer {self.name!r}: input of shape {tuple(x.shape)} does not have "
                f"{self.zero_point.numel()} channels on axis {self.ch_axis}"
            )

    def grid_input(self, x: torch.Tensor) -> torch.Tensor:
        """The value whose rounding to nearest on the grid gives this quantizer's codes for ``x``."""
        return x.detach()

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        self.check_shape(x)
        scale, zero_point = self.channel_params()
        return quantize_uniform(self.grid_input(x), scale.detach(), zero_point, self.qmin, self.qmax,
                                self.ch_axis)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        scale, zero_point = self.channel_params()
        return dequantize_uniform(codes, scale.detach(), zero_point, self.ch_axis)

    def export(self) -> dict[str, np.ndarray]:
        self.require_calibrated()
        scale, zero_point = self.channel_params()
        axis = {} if self.ch_axis is None else {"axis": np.array(self.ch_axis, dtype=np.int32)}
        return {
            "kind": np.array("uniform"),
            "bits": np.array(self.bits, dtype=np.int32),
            "qmin": np.array(self.qmin, dtype=np.int32),
            "qmax": np.array(self.qmax, dtype=np.int32),
            "per_channel": np.array(self.ch_axis is not None),
            **axis,
            "scale": scale.detach().cpu().float().numpy().reshape(-1),
            "zero_point": zero_point.cpu().numpy().astype(np.int32).reshape(-1),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, symmetric={self.symmetric}, ch_axis={self.ch_axis}"
