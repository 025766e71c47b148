"""CAG: channel-aware grouping, a uniform LSQ activation quantizer whose channels share (scale, zero point)
within groups.

Calibration gives per-channel parameters (channel axis = last axis) from the per-channel running-average
min/max. ``regroup(k)`` clusters the channels into ``k`` groups with K-means and gives each group a range
built from its members' ends ``lo = s*(qmin - z)``, ``hi = s*(qmax - z)``: by default their envelope
(``group_range="envelope"``: the lowest ``lo`` to the highest ``hi``, so no member is clipped), or, as in the
reference, their mean (``"mean"``: the group scale is exactly the mean of the member scales, and the wider
members of every group are clipped; on the trained testbed with a 200-step CPU reconstruction budget this
clipping compounds block after block in the encoder and costs AHCPTQ several mAP points at W6A6).
Progressive merging uses ``progressive_schedule(G) = [8G, 4G, 2G, G]``.

With ``group_range="search"`` (ours; the default of this class, the config's default stays ``envelope``)
each group's range minimises the mean squared error over its members' values: calibration keeps a seeded
uniform sample of at most ``SAMPLE_NUMEL`` input values (whole rows, a persistent buffer, so a resumed run
can regroup), and ``regroup`` runs the MSE range search (``observers.MSEObserver``, ``p = 2``) on every
group's members in that sample. A group can then clip its rare largest values instead of stretching its grid
over them, and one group's error is at most what the envelope or mean rule gives up to the search's
resolution.

Clustering features: each channel's ``(lo, hi)``, each standardised across channels. Both ends are in the
activation's own unit, so neither is an arbitrary mix of units (the reference clusters the raw
``(scale, zero point)`` pair, where the integer zero point dominates whenever scales are much smaller than
one), and standardising keeps the two ends equally weighted whatever the layer's magnitude.

Optimizer safety: ``scale`` is a fixed-size ``[C]`` Parameter (the most groups there can be); the first
``groups`` entries hold the group scales and ``group_index`` maps each channel to its entry, so regrouping
rewrites values in place and keeps the Parameter object, and optimizers and LR schedules built before it
stay valid (the unused tail entries get no gradient). Adam moments of a reused entry carry over from
whichever channel or group held it before.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..granularity import ChannelGroups, Granularity
from ..observers import MSEObserver
from ..primitives import expand_groups, qparams_from_minmax, qrange
from .base import Role
from .uniform import LSQQuantizer

__all__ = ["SAMPLE_NUMEL", "CAGOptions", "CAGQuantizer", "GroupRange", "cluster_grids",
           "progressive_schedule", "searched_group_grids"]


class GroupRange(str, enum.Enum):
    """How a group's range comes from its members' ranges."""

    ENVELOPE = "envelope"  # the lowest lo to the highest hi: no member is clipped (ours)
    MEAN = "mean"  # the mean of the members' ends: the mean member scale (the references)
    SEARCH = "search"  # the range of least squared error over the members' sampled values (ours)


SAMPLE_NUMEL = 2**20  # values of the calibration sample kept for the range search (whole rows)


@dataclass(frozen=True)
class CAGOptions:
    """CAG's own settings: the K-means seed and how a group's range comes from its members'."""

    seed: int = 0
    group_range: GroupRange = GroupRange.SEARCH


def progressive_schedule(groups: int = 4) -> list[int]:
    """Group counts of the progressive merging rounds: ``[8G, 4G, 2G, G]``."""
    if groups < 1:
        raise ValueError(f"progressive_schedule: groups must be >= 1, got {groups}")
    return [8 * groups, 4 * groups, 2 * groups, groups]


def cluster_grids(
    scale: torch.Tensor, zero_point: torch.Tensor, k: int, bits: int, symmetric: bool, *, seed: int = 0,
    n_init: int = 10, group_range: GroupRange | str = GroupRange.MEAN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-means of per-channel grids ``[C]`` into at most ``k`` groups (see the module docstring).

    Returns ``(group_index [C] int64, group_scale [G], group_zero_point [G] int32)`` on ``scale``'s device,
    ``G <= k`` being the clusters K-means used (numbered ``0..G-1``). Shared by CAG's activation groups and
    the weight groups (``weight_groups.py``), so both cluster the same way.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = scale * (qmin - zero_point.float())
    hi = scale * (qmax - zero_point.float())
    feats = torch.stack([lo, hi], dim=1).double().cpu().numpy()
    std = feats.std(axis=0)
    feats = (feats - feats.mean(axis=0)) / np.where(std > 0, std, 1.0)
    labels = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(feats)
    index = torch.as_tensor(labels, dtype=torch.int64, device=scale.device)
    index = torch.unique(index, return_inverse=True)[1]  # K-means may leave clusters empty
    used = int(index.max()) + 1
    counts = torch.bincount(index, minlength=used).to(lo.dtype)
    if GroupRange(group_range) is GroupRange.ENVELOPE:
        empty = torch.zeros(used, device=lo.device)
        group_lo = empty.scatter_reduce(0, index, lo, "amin", include_self=False)
        group_hi = empty.scatter_reduce(0, index, hi, "amax", include_self=False)
    else:
        group_lo = torch.zeros(used, device=lo.device).index_add_(0, index, lo) / counts
        group_hi = torch.zeros(used, device=lo.device).index_add_(0, index, hi) / counts
    group_scale, group_zp = qparams_from_minmax(group_lo.cpu(), group_hi.cpu(), bits, symmetric)
    return index, group_scale.to(scale.device), group_zp.round().to(scale.device, torch.int32)


@torch.no_grad()
def searched_group_grids(sample: torch.Tensor, index: torch.Tensor, bits: int, symmetric: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``g`` of ``index`` (channel -> group), the (scale, zero point) of least squared error over
    the values ``sample[:, index == g]``."""
    scales, zero_points = [], []
    for g in range(int(index.max()) + 1):
        observer = MSEObserver(bits, symmetric, p=2.0, name=f"group {g}")
        observer.observe(sample[:, (index == g).to(sample.device)])
        scale, zero_point = observer.qparams()
        scales.append(scale.reshape(()))
        zero_points.append(zero_point.reshape(()))
    device = index.device
    return torch.stack(scales).to(device), torch.stack(zero_points).round().to(device, torch.int32)


class CAGQuantizer(LSQQuantizer):
    """Grouped-channel uniform quantizer on the last axis; ``groups`` is the final group count G."""

    family = "cag"
    calibration_state = ("range_sample",)
    granularities = (ChannelGroups,)
    options = CAGOptions

    def __init__(
        self,
        role: Role = Role.INPUT,
        bits: int = 8,
        *,
        symmetric: bool = False,
        observer: str = "avg_minmax",
        groups: int | None = 4,
        seed: int = 0,
        n_init: int = 10,
        group_range: GroupRange | str = GroupRange.SEARCH,
        name: str = "",
    ) -> None:
        if groups is not None and groups < 1:
            raise ValueError(f"quantizer {name!r}: groups must be >= 1, got {groups}")
        super().__init__(role, bits, symmetric=symmetric, ch_axis=-1, observer=observer, name=name)
        self.target_groups = groups
        self.seed = seed
        self.n_init = n_init
        try:
            self.group_range = GroupRange(group_range)
        except ValueError:
            raise ValueError(f"quantizer {name!r}: group_range must be one of "
                             f"{', '.join(g.value for g in GroupRange)}, got {group_range!r}") from None
        self.register_buffer("group_index", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("groups", torch.tensor(1, dtype=torch.int64))
        self.register_buffer("range_sample", torch.zeros(0, 0))
        self._sampled_rows = 0

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.range_sample = torch.zeros(0, 0, device=self.range_sample.device)
        self._sampled_rows = 0

    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        super().observe(x)
        if self.group_range is GroupRange.SEARCH:
            self._sample_rows(x.detach().reshape(-1, x.shape[-1]).float())

    def _sample_rows(self, rows: torch.Tensor) -> None:
        """Reservoir sampling: every row seen in this calibration pass is in the sample with the same
        probability (seeded by ``seed`` and the rows seen before, so the sample is reproducible)."""
        capacity = max(1, SAMPLE_NUMEL // rows.shape[1])
        seen = self._sampled_rows
        self._sampled_rows += rows.shape[0]
        if self.range_sample.numel() == 0:
            self.range_sample = rows.new_zeros(0, rows.shape[1])
        free = capacity - self.range_sample.shape[0]
        if free > 0:
            self.range_sample = torch.cat([self.range_sample, rows[:free]])
            rows, seen = rows[free:], seen + min(free, rows.shape[0])
        if rows.shape[0] == 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + seen)
        positions = torch.arange(seen + 1, seen + rows.shape[0] + 1, dtype=torch.float64)
        slots = (torch.rand(rows.shape[0], generator=gen, dtype=torch.float64) * positions).long()
        chosen = slots < capacity
        self.range_sample[slots[chosen].to(rows.device)] = rows[chosen]

    @property
    def granularity(self) -> Granularity:
        return ChannelGroups(self.target_groups)

    def compute_params(self) -> None:
        super().compute_params()
        channels = self.zero_point.numel()
        self.group_index = torch.arange(channels, device=self.zero_point.device)
        self.groups.fill_(channels)

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (expand_groups(self.effective_scale(), self.group_index),
                expand_groups(self.zero_point, self.group_index))

    def check_shape(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.group_index.numel():
            raise ValueError(f"quantizer {self.name!r}: input of shape {tuple(x.shape)} does not have "
                             f"{self.group_index.numel()} channels on the last axis")

    def grad_factor(self, x: torch.Tensor) -> float:
        # per-channel LSQ factor: elements per channel, whatever the grouping
        return 1.0 / float(np.sqrt(x.numel() / self.group_index.numel() * self.qmax))

    @torch.no_grad()
    def regroup(self, k: int) -> None:
        """Cluster the channels' current ranges into ``k`` groups sharing (scale, zero point)."""
        self.require_calibrated()
        channels = self.group_index.numel()
        if not 1 <= k <= channels:
            raise ValueError(f"quantizer {self.name!r}: regroup({k}) needs 1 <= k <= {channels} channels")
        scale, zero_point = self.channel_params()
        searched = self.group_range is GroupRange.SEARCH
        if searched and self.range_sample.numel() == 0:
            raise RuntimeError(f"quantizer {self.name!r}: group_range 'search' needs the calibration sample; "
                               "calibrate this quantizer before regrouping")
        rule = GroupRange.MEAN if searched else self.group_range  # the searched ranges replace the rule's
        index, group_scale, group_zp = cluster_grids(scale.detach(), zero_point, k, self.bits, self.symmetric,
                                                     seed=self.seed, n_init=self.n_init, group_range=rule)
        if searched:
            group_scale, group_zp = searched_group_grids(self.range_sample, index, self.bits, self.symmetric)
        used = group_scale.numel()
        self.scale.data.fill_(1.0)
        self.scale.data[:used] = group_scale.to(self.scale.device)
        self.zero_point.zero_()
        self.zero_point[:used] = group_zp.to(self.zero_point.device)
        self.group_index.copy_(index)
        self.groups.fill_(used)
        self.clear_cache()  # the scale was rewritten through .data, which keeps its version

    @torch.no_grad()
    def merge_to_target(self) -> None:
        """Merge through the progressive schedule down to the final group count, as reconstruction does
        between its rounds; for runs that skip reconstruction, so they are scored with G groups, not per
        channel. No-op once the quantizer has at most G groups."""
        if self.target_groups is None:
            return
        for k in progressive_schedule(self.target_groups):
            if k < int(self.groups):
                self.regroup(k)

    def export(self) -> dict[str, np.ndarray]:
        self.require_calibrated()
        used = int(self.groups)
        return {
            "kind": np.array("cag"),
            "bits": np.array(self.bits, dtype=np.int32),
            "qmin": np.array(self.qmin, dtype=np.int32),
            "qmax": np.array(self.qmax, dtype=np.int32),
            "groups": np.array(used, dtype=np.int32),
            "scale": self.effective_scale().detach().cpu().float().numpy()[:used],
            "zero_point": self.zero_point.cpu().numpy().astype(np.int32)[:used],
            "group_index": self.group_index.cpu().numpy().astype(np.int32),
        }
