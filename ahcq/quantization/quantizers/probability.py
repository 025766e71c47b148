"""The value-aware search that LNQ and AGQ share, for post-softmax attention probabilities.

Both families have a shape parameter picked from a list of candidates (LNQ's curvature ``alpha``, AGQ's
log base exponent ``tau``) and a range scalar (LNQ's clip, AGQ's scale). Calibration tries every candidate
and, for each, finds the range scalar by bounded scalar minimisation of the value-aware error
``mean(|(x_hat - x) @ V|**p)`` (``value=`` V in the call context; the plain error without it; ``p`` = 2.4 in
the references, 2 by default here, the squared error), measured on
at most ``search.SEARCH_MAX_ROWS`` seeded random probability rows (the bounds use every row). Errors add
up and range scalars average over batches; the candidate with the least total error is kept.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Quantizer, Role
from .search import bounded_argmin, subsample_rows, value_error

__all__ = ["ProbabilityQuantizer", "check_probabilities"]


def check_probabilities(x: torch.Tensor, name: str) -> None:
    """Attention-probability quantizers need non-negative input."""
    if bool((x < 0).any()):
        raise ValueError(f"quantizer {name!r}: expects probabilities >= 0, got min {float(x.min()):.4g}")


class ProbabilityQuantizer(Quantizer):
    """A per-tensor quantizer of probabilities calibrated by the value-aware search.

    Subclasses name their shape parameter (``candidate_name``) and give the search bounds of the range
    scalar (``search_bounds``), the fake-quant at one candidate (``candidate_fake_quant``) and how the winner
    becomes the quantizer's parameters (``adopt``).
    """

    uses_observer = False
    candidate_name = "candidate"
    calibration_state = ("search_errors", "search_sums")

    def __init__(self, role: Role, bits: int, candidates: Sequence[float], name: str, error_p: float = 2.0
                 ) -> None:
        super().__init__(role, bits, name)
        if not 1.0 <= error_p <= 4.0:
            raise ValueError(f"quantizer {name!r}: error_p must be in [1, 4], got {error_p}")
        self.error_p = float(error_p)
        if not candidates or any(not c > 0 for c in candidates):
            raise ValueError(f"quantizer {name!r}: {self.candidate_name}s must be non-empty and positive, "
                             f"got {candidates}")
        self.candidates = tuple(float(c) for c in candidates)
        self.register_buffer("search_errors", torch.zeros(len(self.candidates), dtype=torch.float64))
        self.register_buffer("search_sums", torch.zeros(len(self.candidates), dtype=torch.float64))

    def search_bounds(self, x_max: float) -> tuple[float, float]:
        """Interval searched for the range scalar, given the batch's largest probability."""
        raise NotImplementedError(f"{type(self).__name__}.search_bounds")

    def candidate_fake_quant(self, x: torch.Tensor, candidate: float, scalar: float) -> torch.Tensor:
        """Fake-quant of ``x`` with shape parameter ``candidate`` and range scalar ``scalar``."""
        raise NotImplementedError(f"{type(self).__name__}.candidate_fake_quant")

    def adopt(self, candidate: float, scalar: float) -> None:
        """Make the search's winner this quantizer's parameters."""
        raise NotImplementedError(f"{type(self).__name__}.adopt")

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.search_errors.zero_()
        self.search_sums.zero_()

    def observe(self, x: torch.Tensor, value: torch.Tensor | None = None, **ctx: Any) -> None:
        check_probabilities(x, self.name)
        x = x.float()
        lo, hi = self.search_bounds(float(x.max()))
        x, value = subsample_rows(x, value, seed=self.observed_batches)  # bounds from every row
        for i, candidate in enumerate(self.candidates):

            def error(scalar: float, candidate: float = candidate) -> float:
                return value_error(self.candidate_fake_quant(x, candidate, scalar), x, value, self.error_p)

            scalar, err = bounded_argmin(error, lo, hi)
            self.search_errors[i] += err
            self.search_sums[i] += scalar

    def compute_params(self) -> None:
        best = int(torch.argmin(self.search_errors))
        self.adopt(self.candidates[best], float(self.search_sums[best]) / self.observed_batches)
