"""Perceptual-consistency clipping (PCC, SAQ-SAM): choose activation clipping by attention overlap.

Query/key activations of the mask decoder carry huge outliers; min-max ranges waste the grid on them. PCC
keeps what the attention *looks at*: the focus mask ``A > θ·rowmax(A)`` of the fake-quantized attention
should overlap the float one. For each candidate percentile ``p`` the tensor is clipped to its
``(1 − p, p)`` quantiles, quantized on a uniform asymmetric per-tensor grid, and the attention map is
recomputed; the ``p`` with the smallest ``1 − IoU`` wins. Several tensors are searched greedily, in order,
each with the earlier ones already quantized.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ahcq.quantization.primitives import fake_quant_uniform, qparams_from_minmax, qrange

__all__ = [
    "ClipResult", "attention_mask", "clip_range", "iou_distance", "search_clip", "search_clip_sequential",
]

QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class ClipResult:
    """Chosen percentile ``p``, clipping range ``[lo, hi]`` and the attention distance it reached."""

    percentile: float
    lo: float
    hi: float
    distance: float


def attention_mask(attn: Tensor, threshold: float) -> Tensor:
    """``A > threshold · max over keys (last axis)``: where each query's attention is focused."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"attention_mask: threshold must be in (0, 1), got {threshold}")
    return attn > threshold * attn.amax(dim=-1, keepdim=True)


def iou_distance(attn: Tensor, ref: Tensor, threshold: float = 0.5) -> float:
    """Mean over (batch, head) of ``1 − IoU`` of the focus masks of ``attn`` and ``ref`` ``[B, H, Q, K]``.

    The IoU of each (batch, head) pair counts over all queries and keys; an empty union counts as IoU 1.
    """
    if attn.shape != ref.shape or attn.dim() < 3:
        raise ValueError(f"iou_distance: shapes {tuple(attn.shape)} and {tuple(ref.shape)} must match and "
                         "have at least [batch, queries, keys]")
    a, b = attention_mask(attn, threshold), attention_mask(ref, threshold)
    inter = (a & b).flatten(-2).sum(-1).to(torch.float64)
    union = (a | b).flatten(-2).sum(-1).to(torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float((1.0 - iou).mean())


def clip_range(
    x: Tensor, percentile: float, limit: int = QUANTILE_LIMIT, seed: int = 0
) -> tuple[float, float]:
    """``(quantile_{1−p}, quantile_p)`` of ``x``; above ``limit`` elements, of a seeded uniform subsample."""
    if not 0.5 < percentile <= 1.0:
        raise ValueError(f"clip_range: percentile must be in (0.5, 1], got {percentile}")
    flat = x.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("clip_range: tensor is empty or contains NaN or Inf")
    if percentile == 1.0:
        return float(flat.min()), float(flat.max())
    if flat.numel() > limit:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randint(flat.numel(), (limit,), generator=generator).to(flat.device)
        flat = flat[index]
    q = torch.quantile(flat, torch.tensor([1.0 - percentile, percentile], device=flat.device))
    return float(q[0]), float(q[1])


def _fake_quant_clipped(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    scale, zero_point = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), bits, symmetric=False)
    qmin, qmax = qrange(bits, symmetric=False)
    return fake_quant_uniform(x, scale.to(x.device), zero_point.to(x.device), qmin, qmax)


def _quantizer(lo: float, hi: float, bits: int) -> Callable[[Tensor], Tensor]:
    return lambda x: _fake_quant_clipped(x, lo, hi, bits)


@torch.no_grad()
def search_clip(
    tensor_to_clip: Tensor,
    attention_fn: Callable[[Tensor], Tensor],
    fp_attention: Tensor,
    percentiles: Sequence[float],
    bits: int,
    threshold: float = 0.5,
) -> ClipResult:
    """Best clipping of ``tensor_to_clip``: ``attention_fn(fake_quant(x))`` closest to ``fp_attention``.

    Ties keep the earlier candidate, so list percentiles from the most aggressive clipping upwards if the
    stronger clipping should win ties.
    """
    if not percentiles:
        raise ValueError("search_clip: no candidate percentiles given")
    best: ClipResult | None = None
    for p in percentiles:
        lo, hi = clip_range(tensor_to_clip, float(p))
        attn = attention_fn(_fake_quant_clipped(tensor_to_clip, lo, hi, bits))
        distance = iou_distance(attn, fp_attention, threshold)
        if best is None or distance < best.distance:
            best = ClipResult(float(p), lo, hi, distance)
    return best


@torch.no_grad()
def search_clip_sequential(
    attention_fn: Callable[[Sequence[Callable[[Tensor], Tensor]]], Tensor],
    n_points: int,
    fp_attention: Tensor,
    percentiles: Sequence[float],
    bits: int,
    threshold: float = 0.5,
    passes: int = 1,
    initial: Sequence[ClipResult] | None = None,
) -> list[ClipResult]:
    """Greedy PCC over ``n_points`` quantization points of one attention computation.

    ``attention_fn(fns)`` recomputes the attention map applying ``fns[i]`` at point ``i`` (e.g. q_proj input,
    k_proj input, q, k), so a point's input reflects the quantization of the points before it. Points are
    searched in order, each with the earlier ones quantized at their chosen clipping and the later ones in
    float, or at their ``initial`` clipping when given (``passes > 1`` repeats the sweep with all others
    quantized).
    """
    if n_points < 1 or passes < 1:
        raise ValueError(f"search_clip_sequential: need n_points >= 1, passes >= 1; got {n_points}, {passes}")
    if initial is not None and len(initial) != n_points:
        raise ValueError(f"search_clip_sequential: {len(initial)} initial clippings for {n_points} points")

    def identity(x: Tensor) -> Tensor:
        return x

    results: list[ClipResult | None] = list(initial) if initial is not None else [None] * n_points
    fns: list[Callable[[Tensor], Tensor]] = [
        identity if r is None else _quantizer(r.lo, r.hi, bits) for r in results]
    for _ in range(passes):
        for i in range(n_points):
            captured: list[Tensor] = []

            def record(x: Tensor, store: list[Tensor] = captured) -> Tensor:
                store.append(x)
                return x

            attention_fn([*fns[:i], record, *fns[i + 1:]])
            if len(captured) != 1:
                raise ValueError(f"search_clip_sequential: point {i} ran {len(captured)} times, not once")
            x = captured[0]

            def with_point(xq: Tensor, i: int = i) -> Tensor:
                return attention_fn([*fns[:i], lambda _: xq, *fns[i + 1:]])

            results[i] = search_clip(x, with_point, fp_attention, percentiles, bits, threshold)
            fns[i] = _quantizer(results[i].lo, results[i].hi, bits)
    return [r for r in results if r is not None]
