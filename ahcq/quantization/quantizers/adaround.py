"""AdaRound weight quantizer: learned up/down rounding on a fixed per-channel grid.

The grid (scale, zero point) comes from the observer (MSE by default) and stays fixed. Each weight is
rounded down and then gets a rounding bit: soft ``h(V) = clamp(sigmoid(V)*(ZETA-GAMMA)+GAMMA, 0, 1)`` while
learning, hard ``1[V >= 0]`` after ``harden()``. ``V`` starts where the soft weights equal the float
weights. The hard output is the uniform fake-quant of ``s*(floor(w/s) + bit)``, computed by the primitive.
While learning, the soft weight and the rounding regulariser run in cache-sized slices (autograd Functions
whose backward recomputes ``dh/dV`` instead of saving it), and ``floor(w/s)`` is kept while the weight and
the grid stay the same tensors at the same versions (the weight is frozen during reconstruction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..primitives import fake_quant_uniform
from ..primitives.engine import fill_rows
from .base import Role
from .grid import GridQuantizer

__all__ = ["AdaRoundQuantizer", "BetaSchedule", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


def _soft_bits(alpha: torch.Tensor, slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h(V)`` of (a slice of) logits and, when ``slope``, ``dh/dV``, the clamp's derivative being 1 on the
    open interval (0, 1) like ``torch.clamp``'s; masks as float 0/1 products."""
    sig = torch.sigmoid(alpha)
    soft = torch.mul(sig, ZETA - GAMMA).add_(GAMMA)
    if not slope:
        return soft.clamp_(0.0, 1.0), None
    inside = torch.gt(soft, 0.0, out=torch.empty_like(soft))
    inside.mul_(torch.lt(soft, 1.0, out=torch.empty_like(soft)))
    dh = torch.sub(1.0, sig).mul_(sig).mul_(ZETA - GAMMA).mul_(inside)
    return soft.clamp_(0.0, 1.0), dh


class _SoftRounding(torch.autograd.Function):
    """The soft weight ``s*(clamp(floor(w/s) + h(V) + z, qmin, qmax) - z)`` in one sliced pass; the backward
    recomputes ``dh/dV`` (a sigmoid) instead of saving a derivative tensor. ``alpha``, ``down`` (the floored
    weight): ``[R, K]``; ``scale``, ``zero_point``: ``[R, 1]`` or scalars."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, down: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int) -> torch.Tensor:
        out = torch.empty_like(alpha)

        def fill(a: torch.Tensor, d: torch.Tensor, o: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> None:
            codes = torch.add(d, _soft_bits(a, False)[0]).add_(z)
            torch.mul(s, codes.clamp_(qmin, qmax).sub_(z), out=o)

        fill_rows(fill, [alpha, down, out], [scale, zero_point])
        ctx.bounds = qmin, qmax
        ctx.save_for_backward(alpha, down, scale, zero_point)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        alpha, down, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        grad = grad.contiguous()
        grad_alpha = torch.empty_like(grad)

        def fill(a: torch.Tensor, d: torch.Tensor, g: torch.Tensor, ga: torch.Tensor, s: torch.Tensor,
                 z: torch.Tensor) -> None:
            h, dh = _soft_bits(a, True)
            codes = torch.add(d, h).add_(z)
            inside = torch.gt(codes, qmin, out=h).mul_(torch.lt(codes, qmax, out=codes))
            torch.mul(g, dh.mul_(inside), out=ga).mul_(s)

        fill_rows(fill, [alpha, down, grad, grad_alpha], [scale, zero_point])
        return grad_alpha, None, None, None, None, None


class _RoundingRegularizer(torch.autograd.Function):
    """``sum(1 - |2h(V) - 1|**b)`` in slices; the backward recomputes ``-2b * sign(t) * |t|**(b-1) * dh/dV``
    (``t = 2h - 1``). Powers as ``exp2(b * log2|t|)``: a non-integer ``pow`` costs several times more."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, b: float) -> torch.Tensor:
        total = alpha.new_zeros((), dtype=torch.float64)

        def fill(a: torch.Tensor) -> None:
            nonlocal total
            t = _soft_bits(a, False)[0].mul_(2.0).sub_(1.0)
            total += t.abs_().log2_().mul_(b).exp2_().neg_().add_(1.0).sum()

        fill_rows(fill, [alpha.detach().reshape(-1, 1)])
        ctx.b = b
        ctx.save_for_backward(alpha)
        return total.float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (alpha,) = ctx.saved_tensors
        b = ctx.b
        grad_alpha = torch.empty_like(alpha)
        scale = grad.mul(-2.0 * b)

        def fill(a: torch.Tensor, ga: torch.Tensor) -> None:
            h, dh = _soft_bits(a, True)
            t = h.mul_(2.0).sub_(1.0)
            power = torch.abs(t).log2_().mul_(b - 1.0).exp2_().copysign_(t)
            torch.mul(power, dh, out=ga).mul_(scale)

        fill_rows(fill, [alpha.reshape(-1, 1), grad_alpha.view(-1, 1)])
        return grad_alpha, None


@dataclass(frozen=True)
class BetaSchedule:
    """Temperature ``b`` of the rounding regulariser: ``b_start`` during the warm-up fraction of
    ``iters``, then linear down to ``b_end`` at ``iters``. ``active(t)``: whether the regulariser applies."""

    iters: int
    b_start: float = 20.0
    b_end: float = 2.0
    warm_up: float = 0.2

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"BetaSchedule: iters must be >= 1, got {self.iters}")
        if not 0.0 <= self.warm_up < 1.0:
            raise ValueError(f"BetaSchedule: warm_up must be in [0, 1), got {self.warm_up}")

    def active(self, t: int) -> bool:
        return t >= self.warm_up * self.iters

    def __call__(self, t: int) -> float:
        start = self.warm_up * self.iters
        if t < start:
            return self.b_start
        progress = min((t - start) / (self.iters - start), 1.0)
        return self.b_end + (self.b_start - self.b_end) * (1.0 - progress)


class AdaRoundQuantizer(GridQuantizer):
    """AdaRound on a per-output-channel (``ch_axis=0``) or per-tensor (``ch_axis=None``) grid."""

    family = "adaround"
    scale_parameter = False

    def __init__(
        self,
        role: Role = Role.WEIGHT,
        bits: int = 8,
        *,
        symmetric: bool = False,
        ch_axis: int | None = 0,
        observer: str = "mse",
        name: str = "",
    ) -> None:
        super().__init__(role, bits, symmetric=symmetric, ch_axis=ch_axis, observer=observer, name=name)
        self.register_buffer("hard", torch.tensor(False))
        self.alpha = nn.Parameter(torch.zeros(()))
        self._init_weight: torch.Tensor | None = None

    @property
    def is_hard(self) -> bool:
        return bool(self.hard)

    def harden(self) -> None:
        """Fix every rounding bit to ``1[V >= 0]``."""
        self.require_calibrated()
        self.hard.fill_(True)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._init_weight = None

    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        super().observe(x)
        self._init_weight = x

    def compute_params(self) -> None:
        super().compute_params()
        self.init_rounding(self._init_weight)
        self._init_weight = None

    def grid_changed(self, weight: torch.Tensor) -> None:
        """A rewritten grid restarts the rounding from the float weights."""
        self.init_rounding(weight)

    @torch.no_grad()
    def init_rounding(self, w: torch.Tensor) -> None:
        """Soft rounding where the soft weights equal ``w`` on the current grid, so that learning starts from
        the float weights."""
        rest = w / self.along(self.scale, w) - torch.floor(w / self.along(self.scale, w))
        self.alpha.data = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0).to(self.alpha.device)
        self.hard.fill_(False)
        self.clear_cache()

    def rounding(self) -> torch.Tensor:
        """The rounding bits: soft ``h(V)`` in [0, 1], or hard ``1[V >= 0]`` once hardened."""
        if self.is_hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def regularizer(self, b: float) -> torch.Tensor:
        """``sum(1 - |2h(V) - 1|**b)``: pushes every soft rounding bit toward 0 or 1."""
        return _RoundingRegularizer.apply(self.alpha, float(b))

    def clear_cache(self) -> None:
        """Also forgets the cached ``floor(w/s)``."""
        super().clear_cache()
        self.__dict__["_floor_cache"] = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_floor_cache"] = None
        return state

    def _floor(self, w: torch.Tensor) -> torch.Tensor:
        """``floor(w/s)``, kept while the weight and the grid are the same storages at the same versions (the
        weight is frozen during reconstruction; the soft forward needs it every step)."""
        tensors = (w, self.scale, self.zero_point)
        key = None if any(t.is_inference() for t in tensors) else tuple(
            (t.data_ptr(), t._version, t.shape, t.device) for t in tensors)
        cached = self.__dict__.get("_floor_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[2]
        with torch.no_grad():
            down = torch.floor(w.detach() / self.along(self.scale, w))
        # the aliases keep the keyed storages alive so that no other tensor can reuse their addresses
        self.__dict__["_floor_cache"] = (key, tuple(t.detach() for t in tensors), down) if key else None
        return down

    def check_shape(self, x: torch.Tensor) -> None:
        if x.shape != self.alpha.shape:
            raise ValueError(
                f"quantizer {self.name!r}: weight of shape {tuple(x.shape)} does not match the calibrated "
                f"shape {tuple(self.alpha.shape)}"
            )

    def grid_value(self, w: torch.Tensor) -> torch.Tensor:
        """``s*(floor(w/s) + hard bit)``: the value whose uniform fake-quant is the hardened weight."""
        scale = self.along(self.scale, w)
        return (torch.floor(w.detach() / scale) + (self.alpha.detach() >= 0).to(w.dtype)) * scale

    def grid_input(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes exist once the rounding is hard: the hardened weight's grid value."""
        if not self.is_hard:
            raise RuntimeError(f"quantizer {self.name!r}: integer codes need hardened rounding; "
                               "call harden()")
        return self.grid_value(x)

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.require_calibrated()
        self.check_shape(x)
        if self.is_hard:
            out = fake_quant_uniform(self.grid_value(x), self.scale, self.zero_point, self.qmin, self.qmax,
                                     self.ch_axis)
        else:
            out = self._soft_fake_quant(x)
        return out if keep is None else torch.where(keep, x, out)

    def _soft_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # rows of [R, K] blocks share a grid: the channel axis moved first (a copy unless it is axis 0)
        axis = None if self.ch_axis is None else self.ch_axis % x.dim()
        alpha, down = self.alpha, self._floor(x)
        scale, zero_point = self.scale, self.zero_point.float()
        if axis is None:
            rows = (-1, 1)
        else:
            alpha, down = alpha.movedim(axis, 0), down.movedim(axis, 0)
            rows = (alpha.shape[0], -1)
            scale, zero_point = scale.view(-1, 1), zero_point.view(-1, 1)
        out = _SoftRounding.apply(alpha.reshape(rows), down.reshape(rows), scale, zero_point, self.qmin,
                                  self.qmax)
        return out.view(x.shape) if axis is None else out.view(alpha.shape).movedim(0, axis)

    def export(self) -> dict[str, np.ndarray]:
        self.require_calibrated()
        if not self.is_hard:
            raise RuntimeError(f"quantizer {self.name!r}: export needs hardened rounding; call harden()")
        return super().export()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hard={self.is_hard}"
