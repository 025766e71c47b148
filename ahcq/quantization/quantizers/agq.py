"""AGQ: adaptive-granularity log quantizer for post-softmax attention (base ``2^(1/tau)``).

Calibration is the shared value-aware search (``probability.ProbabilityQuantizer``) over the ``tau`` list
(default 1, 2, 4), the scale searched on ``[min(0.1, 0.01*max), max]``. The chosen ``tau`` is a buffer; the
scale, a Parameter filled in place, is learnable afterwards.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..primitives import SCALE_EPS, dequantize_agq, fake_quant_agq, quantize_agq
from .base import Role
from .probability import ProbabilityQuantizer

__all__ = ["AGQOptions", "AGQuantizer"]

DEFAULT_TAUS = (1, 2, 4)


@dataclass(frozen=True)
class AGQOptions:
    """AGQ's searched log base exponents and the exponent of its searched error (``agq.taus``,
    ``agq.error_p``)."""

    taus: tuple[int, ...] = DEFAULT_TAUS
    error_p: float = 2.0  # the references' 2.4 is the config default (``agq.error_p``)


class AGQuantizer(ProbabilityQuantizer):
    """Per-tensor AGQ."""

    family = "agq"
    options = AGQOptions
    candidate_name = "tau"

    def __init__(self, role: Role = Role.ATTN_PROB, bits: int = 8, *, taus: Sequence[int] = DEFAULT_TAUS,
                 error_p: float = AGQOptions.error_p, name: str = "") -> None:
        super().__init__(role, bits, taus, name, error_p)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("tau", torch.tensor(self.candidates[0]))

    @property
    def taus(self) -> tuple[float, ...]:
        return self.candidates

    def search_bounds(self, x_max: float) -> tuple[float, float]:
        hi = max(x_max, SCALE_EPS)
        return min(0.1, 0.01 * hi), hi

    def candidate_fake_quant(self, x: torch.Tensor, candidate: float, scalar: float) -> torch.Tensor:
        return fake_quant_agq(x, torch.tensor(scalar, device=x.device), candidate, self.bits)

    def adopt(self, candidate: float, scalar: float) -> None:
        self.tau.fill_(candidate)
        self.scale.data.fill_(scalar)

    def _scale(self) -> torch.Tensor:
        self.require_calibrated()
        return torch.clamp(self.scale, min=SCALE_EPS)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_agq(x, self._scale(), float(self.tau), self.bits, keep)

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
