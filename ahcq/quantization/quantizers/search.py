"""Calibration-time searches shared by the HLUQ, LNQ and AGQ quantizers.

The criterion measures the quantization error where it matters: after the consumer of the tensor (the
next layer for HLUQ, the attention-times-value product for LNQ/AGQ), falling back to the tensor itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import minimize_scalar

__all__ = ["bounded_argmin", "consumer_error", "value_error"]


def consumer_error(
    xq: torch.Tensor, x_ref_out: torch.Tensor, consumer: Callable[[torch.Tensor], torch.Tensor] | None
) -> float:
    """Mean squared error of ``consumer(xq)`` against the precomputed ``x_ref_out = consumer(x)``."""
    out = xq if consumer is None else consumer(xq)
    return float(torch.mean((out.double() - x_ref_out.double()) ** 2))


def value_error(xq: torch.Tensor, x: torch.Tensor, value: torch.Tensor | None) -> float:
    """``mean(((xq - x) @ value)**2)``, or ``mean((xq - x)**2)`` without a value tensor."""
    diff = xq - x
    if value is not None:
        diff = torch.matmul(diff, value)
    return float(torch.mean(diff.double() ** 2))


def bounded_argmin(fn: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """Bounded scalar minimisation of ``fn`` on ``[lo, hi]`` (Brent); returns ``(argmin, min)``.

    The bounds themselves are evaluated too, because the bounded method never probes them and the best
    clip is often the largest value.
    """
    if not lo < hi:
        return hi, fn(hi)
    res = minimize_scalar(fn, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6 * hi})
    best = min(((float(res.x), float(res.fun)), (hi, fn(hi)), (lo, fn(lo))), key=lambda p: p[1])
    return best
