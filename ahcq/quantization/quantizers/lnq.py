"""LNQ: log-transform nonlinear quantizer for post-softmax attention probabilities (``x`` in [0, 1]).

Codes are uniform in ``ln(1 + alpha*x) / ln(1 + alpha*clip)``: small ``alpha`` tends to a uniform grid,
large ``alpha`` concentrates levels near 0. Calibration tries every ``alpha`` of a list and, for each, finds
the clip by bounded scalar minimisation on ``[max(1e-4, 0.1*max), max]`` of the value-aware error
``mean(((x_hat - x) @ V)**2)`` (``value=`` V in the call context; the plain error without it), measured on
at most ``search.SEARCH_MAX_ROWS`` seeded random probability rows (the bounds use every row). Errors add
up and clips average over batches; the ``alpha`` with the least total error is kept. ``alpha`` and ``clip``
are buffers: LNQ is not trained during reconstruction.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..primitives import dequantize_lnq, fake_quant_lnq, quantize_lnq
from .base import Quantizer, Role
from .search import bounded_argmin, subsample_rows, value_error

__all__ = ["LNQuantizer"]

DEFAULT_ALPHAS = (0.001, 0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
MIN_CLIP = 1e-4


def check_probabilities(x: torch.Tensor, name: str) -> None:
    """Attention-probability quantizers need non-negative input."""
    if bool((x < 0).any()):
        raise ValueError(f"quantizer {name!r}: expects probabilities >= 0, got min {float(x.min()):.4g}")


class LNQuantizer(Quantizer):
    """Per-tensor LNQ; its value-aware search replaces an observer."""

    family = "lnq"

    def __init__(
        self,
        role: Role = Role.ATTN_PROB,
        bits: int = 8,
        *,
        symmetric: bool = False,
        ch_axis: int | None = None,
        observer: str | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        name: str = "",
    ) -> None:
        super().__init__(role, bits, name)
        if observer is not None:
            raise ValueError(f"quantizer {name!r}: LNQ searches its own range; got observer {observer!r}")
        if symmetric or ch_axis is not None:
            raise ValueError(f"quantizer {name!r}: LNQ is asymmetric and per tensor "
                             f"(got symmetric={symmetric}, ch_axis={ch_axis})")
        if not alphas or any(not a > 0 for a in alphas):
            raise ValueError(f"quantizer {name!r}: alphas must be non-empty and positive, got {alphas}")
        self.alphas = tuple(float(a) for a in alphas)
        self.register_buffer("alpha", torch.tensor(self.alphas[0]))
        self.register_buffer("clip", torch.ones(()))
        self.register_buffer("errors", torch.zeros(len(self.alphas), dtype=torch.float64))
        self.register_buffer("clip_sums", torch.zeros(len(self.alphas), dtype=torch.float64))

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.errors.zero_()
        self.clip_sums.zero_()

    def observe(self, x: torch.Tensor, value: torch.Tensor | None = None, **ctx: Any) -> None:
        check_probabilities(x, self.name)
        x = x.float()
        hi = max(float(x.max()), MIN_CLIP)
        lo = max(MIN_CLIP, 0.1 * hi)
        x, value = subsample_rows(x, value, seed=self.observed_batches)  # bounds from every row
        for i, alpha in enumerate(self.alphas):
            a = torch.tensor(alpha, device=x.device)

            def error(clip: float, a: torch.Tensor = a) -> float:
                xq = fake_quant_lnq(x, torch.tensor(clip, device=x.device), a, self.bits)
                return value_error(xq, x, value)

            clip, err = bounded_argmin(error, lo, hi)
            self.errors[i] += err
            self.clip_sums[i] += clip

    def compute_params(self) -> None:
        best = int(torch.argmin(self.errors))
        self.alpha.fill_(self.alphas[best])
        self.clip.fill_(float(self.clip_sums[best]) / self.observed_batches)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.require_calibrated()
        return fake_quant_lnq(x, self.clip, self.alpha, self.bits, keep)

    def fake_quant_drop(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x, keep)

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
