"""Calibration-time searches shared by the HLUQ, LNQ and AGQ quantizers.

The criterion measures the quantization error where it matters: after the consumer of the tensor (the
next layer for HLUQ, the attention-times-value product for LNQ/AGQ), falling back to the tensor itself.

Attention searches evaluate every candidate on at most ``SEARCH_MAX_ROWS`` probability rows
(``subsample_rows``): the rows (one per batch x head x query) are independent in ``(x_hat - x) @ V``, so a
seeded random subset estimates the same mean error at a fixed cost however large the attention map is.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import minimize_scalar

__all__ = ["SEARCH_MAX_ROWS", "VALUE_ERROR_P", "bounded_argmin", "consumer_error", "subsample_rows",
           "value_error"]

SEARCH_MAX_ROWS = 1024
VALUE_ERROR_P = 2.4  # PTQ4SAM's and AHCQ-SAM's softmax searches score mean |(Q(A) - A) V|^2.4


def consumer_error(
    xq: torch.Tensor, x_ref_out: torch.Tensor, consumer: Callable[[torch.Tensor], torch.Tensor] | None
) -> float:
    """Mean squared error of ``consumer(xq)`` against the precomputed ``x_ref_out = consumer(x)``."""
    out = xq if consumer is None else consumer(xq)
    return float(torch.mean((out.double() - x_ref_out.double()) ** 2))


def value_error(xq: torch.Tensor, x: torch.Tensor, value: torch.Tensor | None,
                p: float = VALUE_ERROR_P) -> float:
    """``mean(|(xq - x) @ value|**p)``, or ``mean(|xq - x|**p)`` without a value tensor."""
    diff = xq - x
    if value is not None:
        diff = torch.matmul(diff, value)
    return float(torch.mean(diff.double().abs() ** p))


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


def subsample_rows(
    x: torch.Tensor, value: torch.Tensor | None, max_rows: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At most ``max_rows`` (default ``SEARCH_MAX_ROWS``) rows of the attention probabilities ``x``
    ``[..., Nq, Nk]`` with their value matrices ``[..., Nk, D]`` (``None``: no value), as ``[R, Nq', Nk]`` and
    ``[R, Nk, D]``.

    The same seeded (``seed``) random queries are kept for every leading index (batch x head), and the
    leading indices are subsampled too when they alone exceed the cap; inputs within the cap are returned
    unchanged, so small searches are exact.
    """
    max_rows = SEARCH_MAX_ROWS if max_rows is None else max_rows
    if x.dim() < 2 or x[..., 0].numel() <= max_rows:
        return x, value
    lead, queries, keys = x.shape[:-2], x.shape[-2], x.shape[-1]
    if value is not None:
        lead = torch.broadcast_shapes(lead, value.shape[:-2])
        value = value.expand(*lead, *value.shape[-2:]).reshape(-1, *value.shape[-2:])
    x = x.expand(*lead, queries, keys).reshape(-1, queries, keys)
    gen = torch.Generator().manual_seed(seed)
    keep_q = max(1, min(queries, max_rows // x.shape[0]))
    if keep_q < queries:
        idx = torch.randperm(queries, generator=gen)[:keep_q].sort().values.to(x.device)
        x = x.index_select(1, idx)
    keep_lead = max(1, max_rows // keep_q)
    if keep_lead < x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=gen)[:keep_lead].sort().values.to(x.device)
        x = x.index_select(0, idx)
        value = value.index_select(0, idx) if value is not None else None
    return x, value
