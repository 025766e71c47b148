"""AGQ: adaptive-granularity log quantizer for post-softmax attention (base ``2^(1/tau)``).

Calibration tries every ``tau`` (default 1, 2, 4) and, for each, finds the scale by bounded scalar
minimisation on ``[min(0.1, 0.01*max), max]`` of the value-aware error ``mean(((x_hat - x) @ V)**2)``
(``value=`` V in the call context; the plain error without it), measured on at most
``search.SEARCH_MAX_ROWS`` seeded random probability rows (the bounds use every row). Errors add up and
scales average over batches; the ``tau`` with the least total error is kept (buffer) and the scale, a
Parameter filled in place, is learnable afterwards.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..primitives import SCALE_EPS, dequantize_agq, fake_quant_agq, quantize_agq
from .base import Quantizer, Role
from .lnq import check_probabilities
from .search import bounded_argmin, subsample_rows, value_error

__all__ = ["AGQuantizer"]

DEFAULT_TAUS = (1, 2, 4)


class AGQuantizer(Quantizer):
    """Per-tensor AGQ; its value-aware search replaces an observer."""

    family = "agq"

    def __init__(
        self,
        role: Role = Role.ATTN_PROB,
        bits: int = 8,
        *,
        symmetric: bool = False,
        ch_axis: int | None = None,
        observer: str | None = None,
        taus: Sequence[int] = DEFAULT_TAUS,
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        if observer is not None:
            raise ValueError(f"quantizer {name!r}: AGQ searches its own range; got observer {observer!r}")
        if symmetric or ch_axis is not None:
            raise ValueError(f"quantizer {name!r}: AGQ is asymmetric and per tensor "
                             f"(got symmetric={symmetric}, ch_axis={ch_axis})")
        if not taus or any(not t > 0 for t in taus):
            raise ValueError(f"quantizer {name!r}: taus must be non-empty and positive, got {taus}")
        self.taus = tuple(float(t) for t in taus)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("tau", torch.tensor(self.taus[0]))
        self.register_buffer("errors", torch.zeros(len(self.taus), dtype=torch.float64))
        self.register_buffer("scale_sums", torch.zeros(len(self.taus), dtype=torch.float64))

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.errors.zero_()
        self.scale_sums.zero_()

    def observe(self, x: torch.Tensor, value: torch.Tensor | None = None, **ctx: Any) -> None:
        check_probabilities(x, self.name)
        x = x.float()
        hi = max(float(x.max()), SCALE_EPS)
        lo = min(0.1, 0.01 * hi)
        x, value = subsample_rows(x, value, seed=self.observed_batches)  # bounds from every row
        for i, tau in enumerate(self.taus):

            def error(scale: float, tau: float = tau) -> float:
                xq = fake_quant_agq(x, torch.tensor(scale, device=x.device), tau, self.bits)
                return value_error(xq, x, value)

            scale, err = bounded_argmin(error, lo, hi)
            self.errors[i] += err
            self.scale_sums[i] += scale

    def compute_params(self) -> None:
        best = int(torch.argmin(self.errors))
        self.tau.fill_(self.taus[best])
        self.scale.data.fill_(float(self.scale_sums[best]) / self.observed_batches)

    def _scale(self) -> torch.Tensor:
        self.require_calibrated()
        return torch.clamp(self.scale, min=SCALE_EPS)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_agq(x, self._scale(), float(self.tau), self.bits, keep)

    def fake_quant_drop(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x, keep)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_agq(x.detach(), self._scale().detach(), float(self.tau), self.bits)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize_agq(codes, self._scale().detach(), float(self.tau), self.bits)

    def export(self) -> dict[str, np.ndarray]:
        return {
            "kind": np.array("agq"),
            "bits": np.array(self.bits, dtype=np.int32),
            "tau": np.array(float(self.tau), dtype=np.float32),
            "scale": np.array(float(self._scale().detach()), dtype=np.float32),
        }
