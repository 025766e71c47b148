"""BIG: bimodality detection and sign folding into the query/key projections."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde
from torch import nn

from ahcq.quantization.transforms.big import fold_sign, is_bimodal, kde_peaks

CHANNELS, HEADS = 32, 4


def _projections(seed: int) -> tuple[nn.Linear, nn.Linear, torch.Tensor]:
    """q/k projections whose key channels sit at +8 or -8 (bias), as in SAM's token->image attention."""
    g = torch.Generator().manual_seed(seed)
    q_proj, k_proj = nn.Linear(16, CHANNELS), nn.Linear(16, CHANNELS)
    with torch.no_grad():
        for layer in (q_proj, k_proj):
            layer.weight.copy_(torch.randn(CHANNELS, 16, generator=g) * 0.3)
        k_proj.bias.copy_(8.0 * torch.where(torch.rand(CHANNELS, generator=g) < 0.5, -1.0, 1.0))
        q_proj.bias.copy_(torch.randn(CHANNELS, generator=g))
    return q_proj, k_proj, torch.randn(3, 50, 16, generator=g)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-head q·kᵀ with channels split contiguously into heads, in float64."""
    b, n, c = q.shape
    qh = q.double().reshape(b, n, HEADS, c // HEADS).transpose(1, 2)
    kh = k.double().reshape(b, -1, HEADS, c // HEADS).transpose(1, 2)
    return qh @ kh.transpose(-1, -2)


def test_fold_sign_preserves_scores_and_makes_keys_unimodal() -> None:
    q_proj, k_proj, x = _projections(0)
    tokens = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    keys = k_proj(x).detach()
    before = _scores(q_proj(tokens), k_proj(x)).detach()
    assert is_bimodal(keys)
    weight_k = k_proj.weight.detach().clone()
    signs = fold_sign(q_proj, k_proj, keys)
    expected = torch.where(keys.reshape(-1, CHANNELS).double().mean(0) >= 0, 1.0, -1.0)
    assert torch.equal(signs, expected.float())
    assert torch.equal(k_proj.weight.detach(), weight_k * signs[:, None])  # sign flips are exact
    after = _scores(q_proj(tokens), k_proj(x)).detach()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)
    folded = k_proj(x).detach()
    assert (folded.reshape(-1, CHANNELS).mean(0) > 0).all()
    assert not is_bimodal(folded)


def test_two_gaussians_are_bimodal_one_is_not() -> None:
    g = torch.Generator().manual_seed(2)
    boxes = [torch.cat([torch.randn(400, generator=g) - 8, torch.randn(400, generator=g) + 8])
             for _ in range(3)]
    peaks = kde_peaks(boxes)
    assert len(peaks) == 2 and np.allclose(np.sort(peaks), [-8, 8], atol=0.6)
    assert not is_bimodal(torch.randn(3000, generator=g))
    assert not is_bimodal(torch.randn(3000, generator=g) * 4 + 8)
    assert not is_bimodal(torch.zeros(100))


def test_all_samples_are_pooled_not_only_the_first() -> None:
    g = torch.Generator().manual_seed(3)
    first_box = torch.randn(500, generator=g) - 8  # one mode alone
    other_box = torch.randn(500, generator=g) + 8
    assert not is_bimodal(first_box)
    assert is_bimodal([first_box, other_box])


def test_peaks_match_an_independent_kde_scan() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(300, generator=g) * 0.5 - 3, torch.randn(700, generator=g) + 4])
    x = x.double().numpy()
    grid = np.linspace(x.min(), x.max(), 128)
    density = gaussian_kde(x)(grid)
    interior = (density[1:-1] > density[:-2]) & (density[1:-1] > density[2:])
    local_max = grid[1:-1][interior & (density[1:-1] >= 0.01 * density.sum())]
    np.testing.assert_allclose(kde_peaks(torch.from_numpy(x)), local_max)


def test_subsampling_cap_and_bad_input() -> None:
    g = torch.Generator().manual_seed(5)
    big = torch.cat([torch.randn(60000, generator=g) - 8, torch.randn(60000, generator=g) + 8])
    assert len(kde_peaks(big, max_points=5000)) == 2
    with pytest.raises(ValueError, match="NaN"):
        kde_peaks(torch.tensor([0.0, float("nan"), 1.0]))
    q_proj, k_proj, x = _projections(6)
    with pytest.raises(ValueError, match="keys have 5 channels"):
        fold_sign(q_proj, k_proj, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="q_proj has 8 outputs"):
        fold_sign(nn.Linear(16, 8), k_proj, k_proj(x))
