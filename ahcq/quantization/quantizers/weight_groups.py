"""CAG applied to weights (AHCPTQ supplement §F, Tab. 6): a weight's per-output-channel grids are replaced by
at most ``k`` shared grids.

The channels are clustered by their grid's range ends exactly as CAG groups an activation's channels
(``cag.cluster_grids``: K-means on the standardised ``(lo, hi)`` ends, group range = mean of the members'
ends). Every channel then takes its group's (scale, zero point) in the quantizer's own per-channel buffers,
so layers, reconstruction and the integer export keep seeing an ordinary per-channel grid whose values
repeat per group; each weight element keeps its own rounding (AdaRound's V is re-initialised on the grouped
grid, so reconstruction learns the rounding on it).
"""
from __future__ import annotations

import torch

from ..granularity import ChannelGroups, PerChannel
from .base import Quantizer
from .cag import cluster_grids
from .grid import GridQuantizer

__all__ = ["group_weight_grid"]


@torch.no_grad()
def group_weight_grid(quantizer: Quantizer, weight: torch.Tensor, k: int, *, seed: int = 0) -> int:
    """Share ``k`` grids among the output channels of a calibrated per-channel weight ``quantizer``.

    ``weight`` is the layer's weight (AdaRound starts its rounding from it). ``k`` is capped at the number
    of distinct channel grids, since K-means cannot make more groups than distinct points. Returns the
    number of groups made. A learnable (``lsq``) scale starts grouped but is learned per channel afterwards.
    """
    if not isinstance(quantizer, GridQuantizer) or isinstance(quantizer.granularity, ChannelGroups):
        raise TypeError(f"quantizer {quantizer.name!r}: weight grouping needs a uniform or AdaRound weight "
                        f"grid, not {quantizer.family!r}")
    if not isinstance(quantizer.granularity, PerChannel):
        raise ValueError(f"quantizer {quantizer.name!r}: a per-tensor grid has no channels to group")
    if k < 1:
        raise ValueError(f"quantizer {quantizer.name!r}: weight groups must be >= 1, got {k}")
    quantizer.require_calibrated()
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point
    distinct = torch.unique(torch.stack([scale, zero_point.to(scale.dtype)], dim=1), dim=0).shape[0]
    index, group_scale, group_zp = cluster_grids(scale, zero_point, min(k, distinct), quantizer.bits,
                                                 quantizer.symmetric, seed=seed)
    quantizer.scale.copy_(group_scale[index])  # in place, versioned: caches keyed on the grid see the change
    quantizer.zero_point.copy_(group_zp[index])
    quantizer.grid_changed(weight)
    return group_scale.numel()
