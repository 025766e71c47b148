"""Observers: calibration statistics -> (min, max) ranges -> uniform (scale, zero point).

Every observer reduces a batch to a per-channel range (``[C]``; one channel for per-tensor) and folds it
into its running statistic, either as a union (running min of minima, max of maxima) or as a running mean.
Granularity is per tensor (``axis=None``), per channel (``axis``) or per group (``axis`` plus a
channel->group index, where a group's range is the union of its channels' ranges).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ahcq.quantization.primitives import fake_quant_uniform, qparams_from_minmax, qrange

__all__ = [
    "OBSERVERS",
    "AvgMSEObserver",
    "AvgMinMaxObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

_QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs


class Observer:
    """Base class: granularity handling, input checks and accumulation of per-batch ranges.

    ``bits`` / ``symmetric`` define the grid the observer calibrates for (used by the searching observers
    and as the defaults of ``qparams``); ``name`` appears in every error.
    """

    running_mean: bool = False  # False: union of batch ranges; True: running mean of batch ranges

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        axis: int | None = None,
        group_index: Tensor | None = None,
        name: str = "observer",
    ) -> None:
        self.name = name
        qrange(bits, symmetric)
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        if group_index is not None:
            if axis is None:
                raise ValueError(f"observer {name!r}: a group index needs a channel axis")
            group_index = torch.as_tensor(group_index)
            if group_index.dim() != 1 or group_index.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"observer {name!r}: group_index must be a 1-D integer tensor")
            if (
                group_index.numel() == 0
                or int(group_index.min()) < 0
                or torch.unique(group_index).numel() != int(group_index.max()) + 1
            ):
                raise ValueError(f"observer {name!r}: group_index must cover every group 0..G-1 (no gaps)")
            group_index = group_index.long()
        self.group_index = group_index
        self.reset()

    def reset(self) -> None:
        """Forget every observed batch."""
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None
        self._batches = 0

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold the range of batch ``x`` into the running statistic."""
        x2d = self._channels(x)
        lo, hi = self._batch_range(x2d)
        if self._lo is None:
            self._lo, self._hi = lo, hi
        elif self.running_mean:
            n = self._batches
            self._lo = (self._lo * n + lo) / (n + 1)
            self._hi = (self._hi * n + hi) / (n + 1)
        else:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        self._batches += 1

    def range(self) -> tuple[Tensor, Tensor]:
        """``(min, max)``: 0-d per tensor, ``[C]`` per channel, ``[G]`` per group."""
        if self._lo is None:
            raise RuntimeError(f"observer {self.name!r} has not observed any data")
        lo, hi = self._lo, self._hi
        if self.group_index is not None:
            index = self.group_index.to(lo.device)
            groups = int(index.max()) + 1
            lo = lo.new_full((groups,), float("inf")).scatter_reduce(0, index, lo, "amin")
            hi = hi.new_full((groups,), float("-inf")).scatter_reduce(0, index, hi, "amax")
        elif self.axis is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        return lo.clone(), hi.clone()

    def qparams(self, bits: int | None = None, symmetric: bool | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point of the observed range (defaults: the observer's own grid)."""
        bits = self.bits if bits is None else bits
        symmetric = self.symmetric if symmetric is None else symmetric
        return qparams_from_minmax(*self.range(), bits, symmetric)

    def _batch_range(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``(min, max)`` of one batch viewed as ``[C, N]``."""
        return torch.aminmax(x2d, dim=1)

    def _channels(self, x: Tensor) -> Tensor:
        """Check ``x`` and view it as ``[C, N]`` (``C = 1`` per tensor)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"observer {self.name!r}: expected a floating-point tensor, got {got}")
        if x.numel() == 0:
            raise ValueError(f"observer {self.name!r}: empty tensor")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"observer {self.name!r}: NaN or Inf in the observed tensor")
        x = x.detach().float()
        if self.axis is None:
            return x.reshape(1, -1)
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"observer {self.name!r}: axis {self.axis} out of range for shape {tuple(x.shape)}"
            )
        channels = x.shape[self.axis]
        if self.group_index is not None and self.group_index.numel() != channels:
            raise ValueError(
                f"observer {self.name!r}: group_index has {self.group_index.numel()} channels, "
                f"the tensor has {channels} along axis {self.axis}"
            )
        if self._lo is not None and self._lo.numel() != channels:
            raise ValueError(
                f"observer {self.name!r}: channel count changed from {self._lo.numel()} to {channels}"
            )
        return x.movedim(self.axis, 0).reshape(channels, -1)


class MinMaxObserver(Observer):
    """Running minimum and maximum."""


class AvgMinMaxObserver(Observer):
    """Running mean of per-batch minima and maxima (the references' default activation observer)."""

    running_mean = True


def _subsample(x2d: Tensor, max_numel: int, seed: int = 0) -> Tensor:
    """At most ``max_numel`` elements: the same random columns for every channel (seeded, deterministic)."""
    channels, n = x2d.shape
    keep = max(1, max_numel // channels)
    if n <= keep:
        return x2d
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randperm(n, generator=gen)[:keep].to(x2d.device)
    return x2d[:, cols]


class MSEObserver(Observer):
    """Range minimising the mean ``|fake_quant(x) - x|^p`` per channel (union over batches).

    A cheaper equivalent of the references' exhaustive grid (100 range fractions x every zero point),
    vectorised over channels, by coordinate descent on (step, zero point):
    1. Windows ``(f*min, f*max)`` scaled about 0 (symmetric grid: ``(-f*amax, f*amax)``) for fractions
       ``f = i/steps``: every ``stride``-th first, then every fraction within ``stride`` of each channel's
       best. ``f = 1`` is min-max itself, so the result is never worse than min-max on the batch.
    2. Asymmetric grids only, ``rounds`` times: keep the best step and slide the window over every zero
       point within ``zp_radius`` of the best one; then keep that zero point and sweep the step as in 1.
    Each move keeps the best candidate so far, so the error only decreases. About
    ``(1 + rounds)*(steps/stride + 2*(stride-1)) + rounds*(2*zp_radius + 1)`` candidates (118 by default)
    instead of ``steps * 2**bits``, each evaluated with the shared fake-quant primitive on at most
    ``max_numel`` elements per batch (a seeded column subsample).
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        axis: int | None = None,
        group_index: Tensor | None = None,
        name: str = "observer",
        p: float = 2.4,
        steps: int = 100,
        stride: int = 5,
        zp_radius: int = 8,
        rounds: int = 2,
        max_numel: int = 2**22,
    ) -> None:
        if not p > 0 or steps < 1 or not 1 <= stride <= steps or zp_radius < 0 or rounds < 0 or max_numel < 1:
            raise ValueError(
                f"observer {name!r}: need p > 0, steps >= 1, 1 <= stride <= steps, zp_radius >= 0, "
                f"rounds >= 0, max_numel >= 1 "
                f"(got {p}, {steps}, {stride}, {zp_radius}, {rounds}, {max_numel})"
            )
        self.p, self.steps, self.stride = p, steps, stride
        self.zp_radius, self.rounds, self.max_numel = zp_radius, rounds, max_numel
        super().__init__(bits, symmetric, axis, group_index, name)

    def qparams(self, bits: int | None = None, symmetric: bool | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point; the grid must be the one the search optimised for."""
        other_bits = bits is not None and bits != self.bits
        if other_bits or (symmetric is not None and symmetric != self.symmetric):
            raise ValueError(
                f"observer {self.name!r} searched ranges for bits={self.bits}, symmetric={self.symmetric}; "
                f"got bits={bits}, symmetric={symmetric}"
            )
        return super().qparams()

    def _batch_range(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        xmin, xmax = torch.aminmax(x2d, dim=1)
        lo, hi = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
        if self.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        search = _RangeSearch(_subsample(x2d, self.max_numel), self.bits, self.symmetric, self.p)
        self._sweep(search, lambda frac: (lo * frac, hi * frac))
        if not self.symmetric:
            qmin, qmax = qrange(self.bits, self.symmetric)
            full_step = (hi - lo) / (qmax - qmin)

            def fixed_zero_point(z: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
                return lambda frac: ((qmin - z) * full_step * frac, (qmax - z) * full_step * frac)

            for _ in range(self.rounds):
                scale, zp = search.best_qparams()
                for dz in range(-self.zp_radius, self.zp_radius + 1):
                    z = torch.clamp(zp + dz, qmin, qmax)
                    search.try_range((qmin - z) * scale, (qmax - z) * scale)
                self._sweep(search, fixed_zero_point(search.best_qparams()[1]))
        return search.best_lo, search.best_hi

    def _sweep(self, search: _RangeSearch, window: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
        """Try ``window(f)`` for fractions ``f = i/steps``: coarse (every ``stride``-th), then fine around
        each channel's best coarse fraction."""
        best_err = torch.full_like(search.best_err, float("inf"))
        best_i = torch.full_like(search.best_err, self.steps)

        def attempt(i: Tensor) -> None:
            nonlocal best_err, best_i
            err = search.try_range(*window(i / self.steps))
            better = err < best_err
            best_err, best_i = torch.where(better, err, best_err), torch.where(better, i, best_i)

        for i in range(self.steps, 0, -self.stride):
            attempt(torch.full_like(best_i, i))
        coarse = best_i.clone()
        for d in range(1 - self.stride, self.stride):
            if d:
                attempt(torch.clamp(coarse + d, 1, self.steps))


class _RangeSearch:
    """Per-channel best candidate range so far, by mean ``|fake_quant(x) - x|^p`` on ``x`` ``[C, N]``."""

    def __init__(self, x2d: Tensor, bits: int, symmetric: bool, p: float) -> None:
        self.x2d, self.bits, self.symmetric, self.p = x2d, bits, symmetric, p
        channels = x2d.shape[0]
        self.best_err = x2d.new_full((channels,), float("inf"))
        self.best_lo, self.best_hi = x2d.new_zeros(channels), x2d.new_zeros(channels)

    def try_range(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Evaluate the candidate ``[lo, hi]``, keep it where better, return its error."""
        qmin, qmax = qrange(self.bits, self.symmetric)
        scale, zero_point = qparams_from_minmax(lo, hi, self.bits, self.symmetric)
        diff = (fake_quant_uniform(self.x2d, scale, zero_point, qmin, qmax, axis=0) - self.x2d).abs_()
        err = (diff.square_() if self.p == 2 else diff.pow_(self.p)).mean(dim=1)
        better = err < self.best_err
        self.best_err = torch.where(better, err, self.best_err)
        self.best_lo = torch.where(better, lo, self.best_lo)
        self.best_hi = torch.where(better, hi, self.best_hi)
        return err

    def best_qparams(self) -> tuple[Tensor, Tensor]:
        return qparams_from_minmax(self.best_lo, self.best_hi, self.bits, self.symmetric)


class AvgMSEObserver(MSEObserver):
    """Running mean of per-batch MSE-optimal ranges."""

    running_mean = True


class PercentileObserver(Observer):
    """Running mean of per-batch ``lower`` / ``upper`` percentiles (in percent, as ``numpy.percentile``).

    Batches beyond torch.quantile's size limit are evaluated on a seeded column subsample.
    """

    running_mean = True

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        axis: int | None = None,
        group_index: Tensor | None = None,
        name: str = "observer",
        lower: float = 0.01,
        upper: float = 99.99,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"observer {name!r}: need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper
        super().__init__(bits, symmetric, axis, group_index, name)

    def _batch_range(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        x2d = _subsample(x2d, _QUANTILE_MAX_NUMEL)
        q = torch.tensor([self.lower / 100.0, self.upper / 100.0], device=x2d.device)
        lo, hi = torch.quantile(x2d, q, dim=1)
        return lo, hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "avg_minmax": AvgMinMaxObserver,
    "mse": MSEObserver,
    "avg_mse": AvgMSEObserver,
    "percentile": PercentileObserver,
}


def make_observer(kind: str, **kwargs) -> Observer:
    """Build the observer registered as ``kind`` (see ``OBSERVERS``)."""
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[kind](**kwargs)
