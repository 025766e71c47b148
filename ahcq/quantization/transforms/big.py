"""Bimodal integration (BIG, PTQ4SAM): detect two-hump key activations and fold a channel sign into q/k.

Some key projections produce channels that sit on one of two symmetric peaks. Multiplying row ``c`` of both
the key and the query projection by ``sign(mean(K[:, c]))`` leaves every attention score ``q·k`` unchanged
(each channel's sign appears twice within its head) while moving all key channels onto one peak, which a
single per-tensor grid then covers far better.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde
from torch import Tensor, nn

__all__ = ["fold_sign", "is_bimodal", "kde_peaks"]


def _pooled_sample(samples: Tensor | Sequence[Tensor], max_points: int, seed: int) -> np.ndarray:
    """Flatten every sample (box, image) and draw at most ``max_points`` values uniformly from all of them."""
    tensors = [samples] if isinstance(samples, Tensor) else list(samples)
    if not tensors:
        raise ValueError("bimodality test: no activation samples given")
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in tensors])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("bimodality test: activations contain NaN or Inf")
    if flat.numel() > max_points:
        generator = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:max_points]]
    return flat.numpy()


def kde_peaks(
    samples: Tensor | Sequence[Tensor],
    global_num: int = 128,
    peak_distance: int = 32,
    peak_height: float = 0.01,
    max_points: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """Locations of the density peaks of the pooled activations.

    A Gaussian KDE is evaluated on ``global_num`` evenly spaced points between the data minimum and maximum;
    a peak counts when its density is at least ``peak_height`` times the sum of the evaluated densities and
    it lies at least ``peak_distance`` grid points from a higher one.
    """
    if global_num < 3 or peak_distance < 1 or not 0.0 <= peak_height <= 1.0 or max_points < 2:
        raise ValueError(
            f"kde_peaks: need global_num >= 3, peak_distance >= 1, peak_height in [0, 1], max_points >= 2; "
            f"got {global_num}, {peak_distance}, {peak_height}, {max_points}"
        )
    x = _pooled_sample(samples, max_points, seed)
    if x.size < 2 or float(x.std()) == 0.0:
        return np.empty(0)
    grid = np.linspace(x.min(), x.max(), global_num)
    density = gaussian_kde(x)(grid)
    peaks, _ = find_peaks(density, height=peak_height * float(density.sum()), distance=peak_distance)
    return grid[peaks]


def is_bimodal(
    samples: Tensor | Sequence[Tensor],
    global_num: int = 128,
    peak_distance: int = 32,
    peak_height: float = 0.01,
    max_points: int = 20000,
    seed: int = 0,
) -> bool:
    """True iff the pooled activations show exactly two density peaks (see :func:`kde_peaks`)."""
    return len(kde_peaks(samples, global_num, peak_distance, peak_height, max_points, seed)) == 2


@torch.no_grad()
def fold_sign(q_proj: nn.Linear, k_proj: nn.Linear, keys: Tensor) -> Tensor:
    """Fold ``sign(mean key channel)`` into the rows of ``k_proj`` and ``q_proj`` in place; return the signs.

    ``keys`` are ``k_proj`` outputs ``[..., C]`` (all boxes and tokens). Heads split the ``C`` channels
    contiguously, so per-channel signs never mix heads and ``q·kᵀ`` is preserved exactly.
    """
    channels = k_proj.out_features
    if q_proj.out_features != channels:
        raise ValueError(f"fold_sign: q_proj has {q_proj.out_features} outputs, k_proj has {channels}")
    if keys.shape[-1] != channels:
        raise ValueError(f"fold_sign: keys have {keys.shape[-1]} channels, k_proj has {channels} outputs")
    mean = keys.detach().reshape(-1, channels).to(torch.float64).mean(dim=0)
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("fold_sign: keys contain NaN or Inf")
    signs = torch.where(mean >= 0, 1.0, -1.0)
    for layer in (q_proj, k_proj):
        s = signs.to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.weight.mul_(s[:, None])
        if layer.bias is not None:
            layer.bias.mul_(s)
    return signs.to(torch.float32)
