"""Grid basics shared by every quantization family: the bit-width limits and constants, the integer code
range and the affine grid of a min/max range, per-channel broadcasting, the straight-through rounding and
LSQ gradient scaling, CAG's group expansion, the code of the log floor, and the argument checks."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = torch.finfo(torch.float32).eps  # smallest scale, as torch's observers use
_LOG_FLOOR = torch.finfo(torch.float32).tiny  # smallest normal float32: keeps log2 finite for zeros


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: asymmetric ``(0, L-1)``, symmetric ``(-L/2, L/2-1)`` with ``L = 2**bits``."""
    _check_bits(bits)
    levels = 2**bits
    return (-levels // 2, levels // 2 - 1) if symmetric else (0, levels - 1)


def qparams_from_minmax(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the grid covering ``[xmin, xmax]`` widened to contain 0.

    The scale is at least ``SCALE_EPS`` so zero-range and constant inputs still give a valid grid; the zero
    point is a float32 tensor holding an integer in ``[qmin, qmax]`` (0 when symmetric).
    """
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32)
    if xmin.shape != xmax.shape:
        raise ValueError(f"qparams_from_minmax: xmin shape {tuple(xmin.shape)} != xmax {tuple(xmax.shape)}")
    if not (torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        raise ValueError("qparams_from_minmax: xmin/xmax contain NaN or Inf")
    if bool((xmin > xmax).any()):
        raise ValueError("qparams_from_minmax: xmin > xmax for some channel")
    lo = torch.clamp(xmin, max=0.0)
    hi = torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    width = hi - lo
    # a range wider than float32 (e.g. [-3e38, 3e38]) would give an infinite scale: divide first there
    width = torch.where(torch.isfinite(width), width / (qmax - qmin), hi / (qmax - qmin) - lo / (qmax - qmin))
    scale = torch.clamp(width, min=SCALE_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    ends = torch.stack([(qmin - zero_point) * scale, (qmax - zero_point) * scale])
    if not bool(torch.isfinite(ends).all()):
        widest = f"[{float(lo.min()):g}, {float(hi.max()):g}]"
        raise ValueError(f"qparams_from_minmax: a range as wide as {widest} has {bits}-bit grid levels "
                         "beyond float32 (with zero on the grid); clip the range")
    return scale, zero_point


def view_along(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """Reshape a ``[C]`` parameter to broadcast against ``x`` along ``axis``."""
    ax = _norm_axis(axis, x)
    if p.dim() != 1 or p.numel() != x.shape[ax]:
        raise ValueError(
            f"view_along: parameter of shape {tuple(p.shape)} does not match axis {axis} "
            f"of x {tuple(x.shape)}"
        )
    shape = [1] * x.dim()
    shape[ax] = -1
    return p.reshape(shape)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def grad_scale(t: Tensor, factor: float) -> Tensor:
    """Return ``t`` unchanged (bit for bit) with its gradient multiplied by ``factor`` (LSQ)."""
    return _GradScale.apply(t, float(factor))


def expand_groups(p: Tensor, group_index: Tensor) -> Tensor:
    """Per-group ``[G]`` parameter -> per-channel ``[C]`` through the channel->group index (CAG).

    Gradients of all member channels accumulate on their group's entry.
    """
    if group_index.dtype not in (torch.int32, torch.int64) or group_index.dim() != 1:
        raise ValueError(f"expand_groups: group_index must be a 1-D integer tensor, got {group_index.dtype} "
                         f"of shape {tuple(group_index.shape)}")
    if p.dim() != 1:
        raise ValueError(f"expand_groups: parameter must be [G], got shape {tuple(p.shape)}")
    if group_index.numel() and (int(group_index.min()) < 0 or int(group_index.max()) >= p.numel()):
        raise ValueError(f"expand_groups: group_index outside [0, {p.numel()})")
    return p[group_index.long()]


def _floor_code(encode: Callable[[Tensor, Tensor], Tensor], device: torch.device) -> float:
    """The code ``encode`` (an ``engine.Encoder``) gives ``_LOG_FLOOR``, the value a log encoder clamps every
    input ``<= 0`` to."""
    floor = torch.full((1,), _LOG_FLOOR, device=device)
    return float(encode(floor, torch.empty_like(floor)))


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record this call; when not, the fake-quants skip their autograd Function
    and compute only the values (the same encoder and decoder, so the same bits)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_keep(keep: Tensor | None, x: Tensor) -> Tensor | None:
    """A QDrop mask: boolean, of ``x``'s shape and device; returned contiguous."""
    if keep is None:
        return None
    if keep.dtype != torch.bool or keep.shape != x.shape or keep.device != x.device:
        raise ValueError(f"keep must be a boolean mask of x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return keep.contiguous()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_positive(what: str, t: Tensor) -> None:
    if t.numel() != 1:
        raise ValueError(f"{what} must be a single value (per-tensor), got shape {tuple(t.shape)}")
    value = _item(t)  # one read: elementwise checks of a 0-d tensor cost several ops per call
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be finite and > 0, got {[value]}")


def _item(t: Tensor) -> float:
    """The value of a one-element tensor as a Python float (exact for float32)."""
    return float(t.detach())


def _norm_axis(axis: int, x: Tensor) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()
