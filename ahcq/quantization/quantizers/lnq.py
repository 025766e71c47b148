"""LNQ: log-transform nonlinear quantizer for post-softmax attention probabilities (``x`` in [0, 1]).

Codes are uniform in ``ln(1 + alpha*x) / ln(1 + alpha*clip)``: small ``alpha`` tends to a uniform grid,
large ``alpha`` concentrates levels near 0. Calibration is the shared value-aware search
(``probability.ProbabilityQuantizer``) over the ``alpha`` list, the clip searched on
``[max(1e-4, 0.1*max), max]``. ``alpha`` and ``clip`` are buffers: LNQ is not trained during reconstruction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..primitives import dequantize_lnq, fake_quant_lnq, quantize_lnq
from .base import Role
from .probability import ProbabilityQuantizer

__all__ = ["LNQOptions", "LNQuantizer"]

DEFAULT_ALPHAS = (0.001, 0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
MIN_CLIP = 1e-4


@dataclass(frozen=True)
class LNQOptions:
    """LNQ's searched curvatures and the exponent of its searched error (``lnq.alphas``, ``lnq.error_p``)."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    error_p: float = 2.0  # the references' 2.4 is the config default (``lnq.error_p``)


class LNQuantizer(ProbabilityQuantizer):
    """Per-tensor LNQ."""

    family = "lnq"
    options = LNQOptions
    candidate_name = "alpha"

    def __init__(self, role: Role = Role.ATTN_PROB, bits: int = 8, *,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, error_p: float = LNQOptions.error_p,
                 name: str = "") -> None:
        super().__init__(role, bits, alphas, name, error_p)
        self.register_buffer("alpha", torch.tensor(self.candidates[0]))
        self.register_buffer("clip", torch.ones(()))

    @property
    def alphas(self) -> tuple[float, ...]:
        return self.candidates

    def search_bounds(self, x_max: float) -> tuple[float, float]:
        hi = max(x_max, MIN_CLIP)
        return max(MIN_CLIP, 0.1 * hi), hi

    def candidate_fake_quant(self, x: torch.Tensor, candidate: float, scalar: float) -> torch.Tensor:
        clip, alpha = torch.tensor(scalar, device=x.device), torch.tensor(candidate, device=x.device)
        return fake_quant_lnq(x, clip, alpha, self.bits)

    def adopt(self, candidate: float, scalar: float) -> None:
        self.alpha.fill_(candidate)
        self.clip.fill_(scalar)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.require_calibrated()
        return fake_quant_lnq(x, self.clip, self.alpha, self.bits, keep)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        return quantize_lnq(x.detach(), self.clip, self.alpha, self.bits)

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        return dequantize_lnq(codes, self.clip, self.alpha, self.bits)

    def export(self) -> dict[str, np.ndarray]:
        self.require_calibrated()
        return {
            "kind": np.array("lnq"),
            "bits": np.array(self.bits, dtype=np.int32),
            "alpha": np.array(float(self.alpha), dtype=np.float32),
            "clip": np.array(float(self.clip), dtype=np.float32),
        }
