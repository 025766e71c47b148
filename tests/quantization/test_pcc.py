"""PCC: attention-overlap metric, clipping search against brute force, greedy sequential search."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ahcq.quantization.transforms.pcc import (
    attention_mask,
    clip_range,
    iou_distance,
    search_clip,
    search_clip_sequential,
)

PERCENTILES = (0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 1.0)
BITS = 4


def _fake_quant_reference(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Asymmetric per-tensor uniform fake quantization, written out in float32 numpy."""
    qmax = 2**bits - 1
    lo32, hi32 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    scale = np.float32(max((hi32 - lo32) / np.float32(qmax), np.float32(1e-8)))
    zero = np.clip(np.float32(0) - np.round(lo32 / scale), 0, qmax)
    codes = np.clip(np.round(x * (np.float32(1) / scale)) + zero, 0, qmax)
    return (scale * (codes - zero)).astype(np.float32)


def _distance_reference(a: np.ndarray, b: np.ndarray, theta: float) -> float:
    ma = a > theta * a.max(axis=-1, keepdims=True)
    mb = b > theta * b.max(axis=-1, keepdims=True)
    inter = (ma & mb).sum(axis=(-2, -1))
    union = (ma | mb).sum(axis=(-2, -1))
    return float(np.mean(1.0 - inter / union))


def _setup(seed: int, outliers: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 5, 8, generator=g)
    k = torch.randn(2, 2, 40, 8, generator=g) * 2
    if outliers:
        k.view(-1)[torch.randperm(k.numel(), generator=g)[:6]] = outliers
    return q, k


def _attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)


def test_mask_and_iou_hand_checked() -> None:
    attn = torch.tensor([[[[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]],
                          [[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]]])
    ref = torch.tensor([[[[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]],
                         [[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]]])
    expected_mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    assert torch.equal(attention_mask(attn, 0.5)[0, 0], expected_mask)
    # head 0: intersection {row0: col1, row1: col0} = 2, union 3 + 4 = 7 -> 1 - 2/7; head 1 identical -> 0
    assert iou_distance(attn, ref, 0.5) == pytest.approx((1 - 2 / 7) / 2)
    assert iou_distance(ref, ref, 0.5) == 0.0


def test_search_matches_brute_force() -> None:
    q, k = _setup(0, outliers=60.0)
    fp = _attention(q, k)
    result = search_clip(k, lambda kq: _attention(q, kq), fp, PERCENTILES, BITS)
    k_np, fp_np = k.numpy(), fp.double().numpy()
    brute = {}
    for p in PERCENTILES:
        lo, hi = np.quantile(k_np, [1 - p, p]) if p < 1 else (k_np.min(), k_np.max())
        kq = torch.from_numpy(_fake_quant_reference(k_np, float(lo), float(hi), BITS))
        brute[p] = _distance_reference(_attention(q, kq).double().numpy(), fp_np, 0.5)
    best = min(brute.values())
    assert result.distance == pytest.approx(best, abs=1e-12)
    assert brute[result.percentile] == pytest.approx(best, abs=1e-12)
    assert result.percentile == next(p for p in PERCENTILES if brute[p] == pytest.approx(best, abs=1e-12))
    expected_lo, expected_hi = np.quantile(k_np, [1 - result.percentile, result.percentile])
    assert (result.lo, result.hi) == pytest.approx((expected_lo, expected_hi), rel=1e-5)


def test_outliers_get_aggressive_clipping() -> None:
    q, k = _setup(1, outliers=300.0)
    fp = _attention(q, k)
    result = search_clip(k, lambda kq: _attention(q, kq), fp, PERCENTILES, BITS)
    full = search_clip(k, lambda kq: _attention(q, kq), fp, (1.0,), BITS)
    assert result.percentile < 1.0
    assert result.hi - result.lo < (full.hi - full.lo) / 10
    assert result.distance < full.distance


def test_sequential_search_is_greedy_in_order() -> None:
    q, k = _setup(2, outliers=80.0)
    q = q * 3
    fp = _attention(q, k)

    def attention_fn(fns):
        return _attention(fns[0](q), fns[1](k))

    first, second = search_clip_sequential(attention_fn, 2, fp, PERCENTILES, BITS)
    alone = search_clip(q, lambda qq: _attention(qq, k), fp, PERCENTILES, BITS)
    assert first == alone  # point 0 searched with point 1 still float
    q_fixed = torch.from_numpy(_fake_quant_reference(q.numpy(), first.lo, first.hi, BITS))
    given_first = search_clip(k, lambda kq: _attention(q_fixed, kq), fp, PERCENTILES, BITS)
    assert second.percentile == given_first.percentile
    assert second.distance == pytest.approx(given_first.distance, abs=1e-12)
    with pytest.raises(ValueError, match="ran 2 times"):
        search_clip_sequential(lambda fns: _attention(fns[0](q), fns[0](k)), 2, fp, PERCENTILES, BITS)


def test_clip_range_subsamples_large_tensors() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    exact = np.quantile(x.numpy(), [0.01, 0.99])
    lo, hi = clip_range(x, 0.99, limit=50_000)
    assert (lo, hi) == pytest.approx(tuple(exact), abs=0.05)
    assert clip_range(x, 0.99, limit=50_000) == (lo, hi)  # seeded
    assert clip_range(x, 1.0) == (float(x.min()), float(x.max()))
    with pytest.raises(ValueError, match="percentile"):
        clip_range(x, 0.3)
    with pytest.raises(ValueError, match="NaN"):
        clip_range(torch.tensor([1.0, float("nan")]), 0.9)
    with pytest.raises(ValueError, match="shapes"):
        iou_distance(torch.rand(1, 2, 3), torch.rand(1, 2, 4))
