"""Stateless quantization math: the only place where a quantization formula lives.

Every family has an encoder (``quantize_*`` -> int32 codes), a decoder (``dequantize_*``) and a fake-quant
(``fake_quant_*``) with ``fake_quant(x) == dequantize(quantize(x))`` bit for bit: the fake-quant runs the
same encoder and decodes through the same code (uniform: the same integer-valued float ops; log families:
the same decode table), and its autograd Function supplies the straight-through gradients for ``x`` and the
learnable parameters: it saves its input and output instead of a graph of intermediates, and its backward
recomputes the derivatives slice by slice (``_sliced_backward``). ``keep=`` fuses QDrop's float/quantized mix
into the fake-quant.

The uniform fake-quant is bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
(it multiplies by the float32 reciprocal of the scale and rounds half to even, as they do); its gradient for
``scale`` is LSQ's (wrap the scale in ``grad_scale`` for LSQ's factor).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from ahcq.quantization import native

__all__ = [
    "NonFiniteInputError",
    "checking_finite",
    "qrange",
    "qparams_from_minmax",
    "view_along",
    "round_ste",
    "grad_scale",
    "fake_quant_uniform",
    "quantize_uniform",
    "dequantize_uniform",
    "expand_groups",
    "quantize_agq",
    "dequantize_agq",
    "fake_quant_agq",
    "quantize_log2",
    "dequantize_log2",
    "fake_quant_log2",
    "quantize_lnq",
    "dequantize_lnq",
    "fake_quant_lnq",
    "quantize_hluq",
    "dequantize_hluq",
    "fake_quant_hluq",
]

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = torch.finfo(torch.float32).eps  # smallest scale, as torch's observers use
_LOG_FLOOR = torch.finfo(torch.float32).tiny  # smallest normal float32: keeps log2 finite for zeros
_SLICE = 1 << 16  # elements per slice of a CPU fake-quant without autograd (see _sliced)


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


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def round_ste(x: Tensor) -> Tensor:
    """Round half to even (as torch's fake-quant kernels) with an identity gradient."""
    return _RoundSTE.apply(x)


def grad_scale(t: Tensor, factor: float) -> Tensor:
    """Return ``t`` unchanged (bit for bit) with its gradient multiplied by ``factor`` (LSQ)."""
    return _GradScale.apply(t, float(factor))


# ---------------------------------------------------------------------------------------------------------
# uniform affine


def _broadcast_qparams(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None
) -> tuple[Tensor, Tensor]:
    """Float32 scale and zero point shaped to broadcast against ``x``."""
    scale, zero_point = scale.float(), zero_point.float()
    if axis is None:
        return scale.reshape(()), zero_point.reshape(())
    return view_along(scale, x, axis), view_along(zero_point, x, axis)


_Grid = tuple[Tensor | float, Tensor | float, Tensor | float]


def _grid(scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> _Grid:
    """``(1/s, qmin - z, qmax - z)`` for ``_relative_codes`` (torch's float32 reciprocal); per-tensor CPU
    bounds as Python floats, the fastest clamp."""
    lo, hi = qmin - zero_point, qmax - zero_point
    if lo.dim() == 0 and lo.device.type == "cpu":
        lo, hi = float(lo), float(hi)
    return 1.0 / scale, lo, hi


def _relative_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, need_mask: bool,
    out: Tensor | None = None, grid: _Grid | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Codes minus the zero point, ``clamp(round(x*(1/s)), qmin-z, qmax-z)`` (equal, in exact integer
    float arithmetic, to ``clamp(round(x*(1/s)) + z, qmin, qmax) - z``), with torch's float32 reciprocal and
    half-to-even rounding; and, when ``need_mask``, whether each code was inside the grid before clamping.
    ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``; ``out`` receives the codes;
    ``grid``: ``_grid``'s result when the caller has it already (slices of one tensor)."""
    inv, lo, hi = grid if grid is not None else _grid(scale, zero_point, qmin, qmax)
    unclamped = torch.mul(x, inv, out=out).round_()
    if not need_mask:
        return unclamped.clamp_(lo, hi), None
    codes = torch.clamp(unclamped, lo, hi)
    return codes, torch.eq(codes, unclamped)


def _fake_quant_forward(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None, need_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    """Fake-quant values and the in-range mask (only when ``need_mask``). Torch's fused kernel on CUDA; on
    CPU the same formula in a few vectorised in-place ops, several times faster than torch's CPU kernels
    (per tensor and per channel)."""
    if x.device.type == "cuda":
        zp = zero_point.to(torch.int32)
        if axis is None:
            enabled = torch.ones(1, dtype=torch.long, device=x.device)
            return torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, scale.reshape(()), zp.reshape(()), enabled, qmin, qmax
            )
        return torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp, axis, qmin, qmax)
    scale_b, zp_b = _broadcast_qparams(x, scale, zero_point, axis)
    codes, mask = _relative_codes(x, scale_b, zp_b, qmin, qmax, need_mask)
    return _scale_codes_(codes, scale_b), mask


def _scale_codes_(codes: Tensor, scale: Tensor | float) -> Tensor:
    """Relative codes -> values, in place. The + 0.0 turns the -0.0 that rounding leaves for x in (-s/2, 0)
    into +0.0, as torch's integer arithmetic (and dequantize_uniform) produce; an in-place add is cheaper
    than a fused addcmul here."""
    return codes.add_(0.0).mul_(scale)


def _native_uniform(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                    keep: Tensor | None) -> Tensor:
    """The uniform fake-quant by the fused kernels (``native``): per tensor (0-d ``scale``) or per channel
    of the last axis of the contiguous ``x`` (``[C]``), with ``_grid``'s float32 reciprocal and bounds."""
    inv, lo, hi = _grid(scale, zero_point, qmin, qmax)
    if scale.dim() == 0:
        return native.uniform(x, _item(inv), float(lo), float(hi), _item(scale), keep)
    return native.uniform_rows(x, inv, lo, hi, scale, keep)


def _native_finite_check(x: Tensor) -> None:
    """Inside ``checking_finite``, the whole-tensor check the fused kernels need (they do not slice)."""
    check = _FINITE_CHECK.get()
    if check is not None:
        check.verify(x)
        check.done = True


class _FakeQuantUniform(torch.autograd.Function):
    """Uniform fake-quant; straight-through gradient for x, LSQ gradient for scale. ``keep`` (QDrop): those
    elements pass through as ``x`` with identity gradient and give the scale none. Saves ``x``, the output
    and ``keep``; the backward recomputes the in-range mask slice by slice (see ``_sliced_backward``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None,
                keep: Tensor | None):
        row = _slice_row(x, axis)
        x = x.contiguous()
        if row and native.usable(x):
            scale_b, zp_b = (t.float().reshape(-1 if row > 1 else ()) for t in (scale, zero_point))
            out = _native_uniform(x, scale_b, zp_b, qmin, qmax, keep)
        elif row == 0:
            scale_b, zp_b = _broadcast_qparams(x, scale, zero_point, axis)
            out = _fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, need_mask=False)[0]
            _keep_values(keep, x, out)
        else:
            scale_b, zp_b = (t.float().reshape(-1 if row > 1 else ()) for t in (scale, zero_point))
            grid = _grid(scale_b, zp_b, qmin, qmax)
            out = torch.empty_like(x)

            def fill(x_p: Tensor, keep_p: Tensor | None, out_p: Tensor) -> None:
                _scale_codes_(_relative_codes(x_p, scale_b, zp_b, qmin, qmax, False, out_p, grid)[0], scale_b)
                _keep_values(keep_p, x_p, out_p)

            _fill_slices(fill, [x, keep, out], row)
        ctx.grid, ctx.row, ctx.axis = (scale_b, zp_b, qmin, qmax), row, axis
        ctx.save_for_backward(x, out, keep, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, scale = ctx.saved_tensors
        scale_b, zp_b, qmin, qmax = ctx.grid
        grid = _grid(scale_b, zp_b, qmin, qmax)
        need_x, need_s = ctx.needs_input_grad[:2]
        if ctx.row == 1 and native.usable(x):
            inv, lo, hi = grid
            grad_x, ds = native.uniform_backward(x, out, keep, grad, _item(inv), lo, hi, need_x)
            grad_s = (_float32(ds) * (1.0 / scale.reshape(()))).reshape(scale.shape) if need_s else None
            return grad_x, grad_s, None, None, None, None, None

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> _Derivatives:
            # in range (the clamp of _relative_codes leaves the rounded code as it is; a float 0/1 mask, five
            # times cheaper than a boolean one): d x_hat/dx = 1, d x_hat/ds = (x_hat - x)/s (= round(x/s) -
            # x/s); clipped: 0 and x_hat/s (= the clamp bound minus z); i.e. (x_hat - x*mask)/s, the 1/s
            # applied after the reduction
            inv, lo, hi = grid
            unclamped = torch.mul(x_p, inv).round_()
            inside = torch.eq(torch.clamp(unclamped, lo, hi), unclamped, out=unclamped)
            dscale = torch.sub(out_p, torch.mul(x_p, inside)) if need_s else None
            return _keep_derivatives(keep_p, inside, [dscale])

        grad_x, (sums,) = _sliced_backward(derivatives, grad, [x, out, keep], ctx.row, ctx.axis, need_x,
                                           [need_s])
        grad_scale_ = None
        if need_s:
            inverse = 1.0 / scale.reshape(-1 if ctx.axis is not None else ())
            grad_scale_ = (sums * inverse).reshape(scale.shape)
        return grad_x, grad_scale_, None, None, None, None, None


def _uniform_args(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None):
    """Validate uniform-grid arguments; return the normalised axis."""
    if qmin >= qmax:
        raise ValueError(f"uniform quantizer: qmin {qmin} must be < qmax {qmax}")
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                f"uniform quantizer: per-tensor needs one scale/zero point, got {tuple(scale.shape)}, "
                f"{tuple(zero_point.shape)}"
            )
        return None
    ax = _norm_axis(axis, x)
    if scale.shape != (x.shape[ax],) or zero_point.shape != (x.shape[ax],):
        raise ValueError(
            f"uniform quantizer: per-channel scale {tuple(scale.shape)} / zero point "
            f"{tuple(zero_point.shape)} do not match axis {axis} of x {tuple(x.shape)}"
        )
    return ax


def fake_quant_uniform(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """``s*(clamp(round(x*(1/s)) + z, qmin, qmax) - z)``, bit-exact with torch's fake-quant ops.

    Gradients: straight-through for ``x`` inside the range, LSQ for ``scale`` (wrap it in ``grad_scale``
    for the LSQ factor). The zero point is not learnable. ``keep`` (QDrop): a boolean mask of ``x``'s shape
    whose elements stay float; the result is ``where(keep, x, fake_quant(x))``, values and gradients.
    """
    ax = _uniform_args(x, scale, zero_point, qmin, qmax, axis)
    if zero_point.requires_grad:
        raise ValueError("fake_quant_uniform: zero_point is not learnable; pass it detached")
    if keep is not None and not _needs_grad(x, scale):
        quantized = fake_quant_uniform(x, scale, zero_point, qmin, qmax, axis)
        return torch.where(_check_keep(keep, x), x, quantized)
    keep = _check_keep(keep, x)
    if not _needs_grad(x, scale):
        xf, scale = x.float(), scale.float()
        if ax is None and native.usable(xf):
            _native_finite_check(xf)
            return _native_uniform(xf, scale.reshape(()), zero_point.float().reshape(()), qmin, qmax,
                                   None).to(x.dtype)
        if xf.device.type == "cpu" and ax is None:
            # the grid as Python floats (the same float32 values): the cheapest scalar operands
            s, z = _item(scale), _item(zero_point)
            grid = (_item(1.0 / scale), qmin - z, qmax - z)

            def fill(part: Tensor, into: Tensor) -> None:
                _scale_codes_(_relative_codes(part, scale, zero_point, qmin, qmax, False, into, grid)[0], s)

            out = _sliced(fill, xf)
        else:
            out = _fake_quant_forward(xf, scale, zero_point, qmin, qmax, ax, need_mask=False)[0]
        return out.to(x.dtype)
    if x.dtype != torch.float32:
        return _FakeQuantUniform.apply(x.float(), scale.float(), zero_point, qmin, qmax, ax, keep).to(x.dtype)
    return _FakeQuantUniform.apply(x, scale.float(), zero_point, qmin, qmax, ax, keep)


@torch.no_grad()
def quantize_uniform(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Integer codes ``clamp(round(x*(1/s)) + z, qmin, qmax)`` as int32."""
    ax = _uniform_args(x, scale, zero_point, qmin, qmax, axis)
    x = x.float()
    scale_b, zp_b = _broadcast_qparams(x, scale, zero_point, ax)
    return _relative_codes(x, scale_b, zp_b, qmin, qmax, need_mask=False)[0].add_(zp_b).to(torch.int32)


def dequantize_uniform(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """``(codes - z) * s`` in float32."""
    scale, zero_point = _broadcast_qparams(codes, scale, zero_point, axis)
    return (codes.float() - zero_point) * scale


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


def _levels(decode: Callable[..., Tensor], bits: int, device: torch.device, *params) -> Tensor:
    """The value of every code ``0..L-1`` (a decode table, at most 256 entries)."""
    return decode(torch.arange(2**bits, dtype=torch.float32, device=device), *params)


def _lookup(levels: Tensor, codes: Tensor, into: Tensor | None = None) -> Tensor:
    """Decode by table lookup: the fake-quants and the dequantizers share it, so they agree bit for bit.

    ``into``: a contiguous float32 tensor of the codes' shape that is no longer needed (the float codes
    themselves) receives the values, saving a large allocation.
    """
    index = codes.to(torch.int32).reshape(-1)
    if into is None:
        return torch.index_select(levels, 0, index).reshape(codes.shape)
    torch.index_select(levels, 0, index, out=into.view(-1))
    return into


class NonFiniteInputError(ValueError):
    """NaN or Inf in the input of a fake-quant called inside ``checking_finite``."""


class _FiniteCheck:
    """The state of one ``checking_finite`` block: ``done`` once a fake-quant has checked its input."""

    def __init__(self) -> None:
        self.done = False

    def verify(self, x: Tensor) -> None:
        """Raise ``NonFiniteInputError`` if ``x`` holds NaN or Inf: one reduction, and the elementwise test
        only when the sum is not finite (finite values can overflow it)."""
        if not math.isfinite(_item(x.sum())) and not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError("NaN or Inf input")


_FINITE_CHECK: ContextVar[_FiniteCheck | None] = ContextVar("ahcq_finite_check", default=None)


@contextmanager
def checking_finite() -> Iterator[_FiniteCheck]:
    """Within the block, the fake-quants without autograd reject NaN/Inf input (``NonFiniteInputError``)
    before encoding it: on CPU slice by slice, one reduction over each cache-resident slice just before its
    encoder reads it (instead of a separate pass over the whole input), elsewhere the table-decoded families
    over the whole input first. The yielded check's ``done`` says whether a fake-quant checked; other paths
    (autograd; uniform per channel or off CPU, which carry NaN through) leave the check to the caller."""
    token = _FINITE_CHECK.set(_FiniteCheck())
    try:
        yield _FINITE_CHECK.get()
    finally:
        _FINITE_CHECK.reset(token)


def _sliced(fill: Callable[[Tensor, Tensor], object], x: Tensor) -> Tensor:
    """``fill(x_part, out_part)`` over slices of at most ``_SLICE`` elements of ``x`` (CPU, no autograd).
    The many elementwise passes of an encoder then run on cache-resident temporaries, which the allocator
    reuses instead of mapping fresh pages (page faults cost as much as the arithmetic); 2^16 elements
    measured best, 2^15 and 2^17 within 10 %. A permuted dense tensor (a transposed view) is walked in
    memory order and the result has its layout, as torch's elementwise ops give; any other layout (a slice
    of a wider tensor, e.g. q out of a qkv projection) is walked in blocks of whole trailing dimensions
    (``_blocks``) straight into a contiguous result, so it is read once instead of being copied first.
    Inside ``checking_finite`` each slice is checked before ``fill`` reads it."""
    check = _FINITE_CHECK.get()
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    dense = x.permute(order)
    if dense.is_contiguous():
        out = torch.empty_like(dense)
        flat_x, flat_out = dense.view(-1), out.view(-1)
        parts: Iterator[tuple[Tensor, Tensor]] = (
            (flat_x[start:start + _SLICE], flat_out[start:start + _SLICE])
            for start in range(0, flat_x.numel(), _SLICE)
        )
        result = out.permute(sorted(range(x.dim()), key=order.__getitem__))
    else:
        result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        parts = _blocks(x, result)
    for part, out_part in parts:
        if check is not None:
            check.verify(part)
        fill(part, out_part)
    if check is not None:
        check.done = True
    return result


def _blocks(x: Tensor, out: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Aligned slices of ``x`` (any layout) and of the contiguous ``out`` of its shape, at most ``_SLICE``
    elements each: the trailing dimensions that fit in a slice whole, a range of the dimension before them,
    every index of the dimensions before that. The ``out`` slices are contiguous."""
    if x.numel() == 0:
        return
    start, inner = x.dim(), 1
    while start > 0 and inner * x.shape[start - 1] <= _SLICE:
        start -= 1
        inner *= x.shape[start]
    if start == 0:
        yield x, out
        return
    chunk_dim, step = start - 1, max(1, _SLICE // inner)
    for lead in itertools.product(*(range(n) for n in x.shape[:chunk_dim])):
        x_lead, out_lead = x[lead], out[lead]
        for begin in range(0, x.shape[chunk_dim], step):
            yield x_lead[begin:begin + step], out_lead[begin:begin + step]


Encoder = Callable[[Tensor, Tensor], Tensor]
"""``encode(x, out)``: the float codes of ``x``, written into ``out`` (float32, ``x``'s shape), returned."""


def _codes_buffer(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


_TableKey = tuple[object, ...]
"""The values that define a table-decoded encoder (family, parameters as floats, bits)."""
_THRESHOLDS: dict[_TableKey, Tensor] = {}
_MAX_THRESHOLD_SETS = 1024


def _native_thresholds(x: Tensor, key: _TableKey, encode: Encoder, levels: Tensor) -> Tensor | None:
    """The code thresholds of ``encode`` when the fused table kernel takes ``x`` (``native``), else None.
    Cached by ``key``: a frozen quantizer searches them once, a learning one once per step."""
    if levels.numel() - 1 > native.MAX_TABLE_THRESHOLDS or not native.usable(x):
        return None
    found = _THRESHOLDS.get(key)
    if found is None:
        if len(_THRESHOLDS) >= _MAX_THRESHOLD_SETS:
            _THRESHOLDS.clear()
        found = _THRESHOLDS[key] = native.code_thresholds(encode, levels.numel())
    return found


def _log_clip(log2_scale: float, tau: float) -> float:
    """The least input whose log exponent ``round(tau*(log2(max(x, _LOG_FLOOR)) - log2_scale))`` is above 0,
    i.e. that a log encoder clips to its scale (NaN: none): the fused backward kernels' region test,
    searched with the torch-op expression of the torch-op backward (``native.code_thresholds``)."""
    key = ("log-clip", log2_scale, tau)
    found = _THRESHOLDS.get(key)
    if found is None:
        def above(x: Tensor, out: Tensor) -> Tensor:
            exponent = torch.clamp(x, min=_LOG_FLOOR, out=out).log2_().sub_(log2_scale).mul_(tau)
            return exponent.round_().clamp_(0, 1)

        if len(_THRESHOLDS) >= _MAX_THRESHOLD_SETS:
            _THRESHOLDS.clear()
        found = _THRESHOLDS[key] = native.code_thresholds(above, 2)
    return _item(found)


def _float32(total: float) -> Tensor:
    """A float64 gradient sum as the float32 0-d tensor the torch-op backward returns."""
    return torch.tensor(total, dtype=torch.float64).float()


def _fake_quant_values(encode: Encoder, levels: Tensor, x: Tensor, key: _TableKey) -> Tensor:
    """A table-decoded fake-quant without autograd: the fused kernel through ``encode``'s thresholds; or
    ``encode`` into the output buffer, then the lookup into the same storage, on CPU slice by slice
    (``_sliced``)."""
    thresholds = _native_thresholds(x, key, encode, levels)
    if thresholds is not None:
        _native_finite_check(x)
        return native.table(x, thresholds, levels)
    if x.device.type != "cpu":
        check = _FINITE_CHECK.get()
        if check is not None:  # NaN codes would index outside the table
            check.verify(x)
            check.done = True
        code = encode(x, _codes_buffer(x))
        return _lookup(levels, code, into=code)
    return _sliced(lambda part, out: _lookup(levels, encode(part, out), into=out), x)


def _floor_code(encode: Encoder, device: torch.device) -> float:
    """The code ``encode`` gives ``_LOG_FLOOR``, the value a log encoder clamps every input ``<= 0`` to."""
    floor = torch.full((1,), _LOG_FLOOR, device=device)
    return float(encode(floor, torch.empty_like(floor)))


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record this call; when not, the fake-quants skip their autograd Function
    and compute only the values (the same encoder and decoder, so the same bits)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sum_like(t: Tensor, param: Tensor) -> Tensor:
    """Reduce a per-element gradient to the shape of the (broadcast) parameter it belongs to."""
    return t.sum_to_size(param.shape) if param.dim() else t.sum()


# ---------------------------------------------------------------------------------------------------------
# training (autograd) paths: forward and backward in slices, QDrop's keep mask


def _check_keep(keep: Tensor | None, x: Tensor) -> Tensor | None:
    """A QDrop mask: boolean, of ``x``'s shape and device; returned contiguous."""
    if keep is None:
        return None
    if keep.dtype != torch.bool or keep.shape != x.shape or keep.device != x.device:
        raise ValueError(f"keep must be a boolean mask of x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return keep.contiguous()


def _slice_row(x: Tensor, axis: int | None) -> int:
    """How an autograd fake-quant walks ``x``: ``1``: in slices of the flattened tensor (CPU, per-tensor
    parameters); ``C``: in slices of whole rows (CPU, per-channel parameters on the last axis); ``0``: in
    one piece (CUDA, whose fused kernels do not gain from it, or another channel axis)."""
    if x.device.type != "cpu":
        return 0
    if axis is None:
        return 1
    return x.shape[-1] if axis % x.dim() == x.dim() - 1 and x.numel() else 0


def _fill_slices(fill: Callable[..., object], tensors: Sequence[Tensor | None], row: int) -> None:
    """``fill(*parts)`` over aligned slices of contiguous tensors of one shape (``None`` stays ``None``),
    each at most ``_SLICE`` elements per intra-op thread, of whole rows of ``row`` elements (``row = 0``:
    one call on the whole tensors). A fake-quant's dozens of elementwise passes then run on cache-resident
    temporaries; only the outputs are written to memory (see ``_sliced``)."""
    if row == 0:
        fill(*tensors)
        return
    views = [None if t is None else t.view(-1) if row == 1 else t.view(-1, row) for t in tensors]
    size = _SLICE * torch.get_num_threads()  # each thread's share of an op stays cache-sized
    step = size if row == 1 else max(1, size // row)
    for start in range(0, views[0].shape[0], step):
        fill(*(None if v is None else v[start:start + step] for v in views))


def _keep_values(keep: Tensor | None, x: Tensor, out: Tensor) -> None:
    """QDrop in a forward: ``out`` becomes ``x`` where ``keep``. Float 0/1 products instead of a boolean
    select (``where``/``masked_fill`` cost thirty times more on CPU); exact, both operands being finite."""
    if keep is not None:
        kept = _float_mask(keep, out)
        out.mul_(torch.sub(1.0, kept)).addcmul_(x, kept)


def _keep_derivatives(keep: Tensor | None, slope: Tensor, param_grads: list[Tensor | None]
                      ) -> tuple[Tensor, list[Tensor | None]]:
    """QDrop in a backward: where ``keep``, the derivative for ``x`` is 1 and for every parameter 0."""
    if keep is None:
        return slope, param_grads
    kept = _float_mask(keep, slope)
    quantized = torch.sub(1.0, kept)
    for t in param_grads:
        if t is not None:
            t.mul_(quantized)
    return slope.mul_(quantized).add_(kept), param_grads


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask as float 0/1 (through uint8: six times cheaper than from bool on CPU)."""
    return torch.empty_like(like).copy_(mask.view(torch.uint8))


_Derivatives = tuple[Tensor, list[Tensor | None]]
"""``(dy/dx, [dy/dparam or None])`` of a slice, for ``_sliced_backward``."""


def _sliced_backward(
    derivatives: Callable[..., _Derivatives], grad: Tensor, saved: Sequence[Tensor | None], row: int,
    axis: int | None, need_x: bool, need_params: Sequence[bool],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The backward of a fake-quant whose forward saved only its inputs and output: ``derivatives(*parts of
    saved)`` recomputes ``(dy/dx, [dy/dparam, or None where not needed])`` for a slice (``row`` as in
    ``_fill_slices``), and this returns ``grad * dy/dx`` (``None`` unless ``need_x``) and, per parameter,
    ``sum(grad * dy/dparam)`` (``None`` unless needed) reduced to the parameter: a scalar (``axis=None``) or
    per channel of ``axis``. Recomputing costs a few cache-resident passes; saving the derivatives would
    cost writing and reading whole tensors."""
    grad = grad.contiguous()
    grad_x = torch.empty_like(grad) if need_x else None
    if row == 0:
        slope, ds = derivatives(*saved)
        if grad_x is not None:
            torch.mul(grad, slope, out=grad_x)
        dims = [] if axis is None else [d for d in range(grad.dim()) if d != axis % grad.dim()]
        return grad_x, [None if d is None else (grad * d).sum() if axis is None else (grad * d).sum(dim=dims)
                        if dims else grad * d for d in ds]
    shape = (row,) if row > 1 else ()
    sums = [grad.new_zeros(shape, dtype=torch.float64) if need else None for need in need_params]

    def fill(g: Tensor, gx: Tensor | None, *parts: Tensor | None) -> None:
        slope, ds = derivatives(*parts)
        if gx is not None:
            torch.mul(g, slope, out=gx)
        for total, d in zip(sums, ds):
            if total is not None:
                total += torch.dot(g, d) if row == 1 else torch.mul(g, d).sum(0)

    _fill_slices(fill, [grad, grad_x, *saved], row)
    return grad_x, [None if t is None else t.float() for t in sums]


# ---------------------------------------------------------------------------------------------------------
# adaptive-granularity log (AGQ) and power-of-two (log2 = AGQ with tau = 1)
#
# The log families' fake-quants are autograd Functions: the forward is the encoder followed by the decoder
# (so it equals dequantize(quantize(x)) bit for bit) and the backward is the straight-through derivative of
# the decoder written out, recomputed from the saved input and output.


def _agq_encoder(scale: Tensor, tau: float, bits: int) -> Encoder:
    """The AGQ encoder (float codes), shared by ``quantize_agq`` and the fake-quants so that they agree bit
    for bit: ``k = round(-tau*(log2(x) - log2(scale)))`` with ``log2(x)`` floored at ``_LOG_FLOOR``; the
    code ``top - k`` clipped to ``[0, top]`` is computed as the equal ``top + round(tau*d)`` (rounding half to
    even is odd-symmetric). The scalar ``log2(scale)`` is computed once per call, and the ``x > 0`` mask is
    skipped when the floor, where every ``x <= 0`` lands, already has code 0 (any scale above about
    ``2^-110``)."""
    top = 2**bits - 1
    log2_scale = _item(torch.log2(scale))

    def unmasked(x: Tensor, out: Tensor) -> Tensor:
        code = torch.clamp(x, min=_LOG_FLOOR, out=out).log2_().sub_(log2_scale).mul_(tau).round_()
        return code.add_(top).clamp_(0, top)

    if not _floor_code(unmasked, scale.device):
        return unmasked

    def masked(x: Tensor, out: Tensor) -> Tensor:
        return unmasked(x, out).mul_(torch.gt(x, 0.0, out=torch.empty_like(out)))

    return masked


def _agq_key(scale: Tensor, tau: float, bits: int) -> _TableKey:
    return ("agq", _item(scale), tau, bits)


def _decode_agq(code: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    top = 2**bits - 1
    level = scale * torch.exp2((code - top) / tau)
    return torch.where(code == 0, torch.zeros_like(level), level)


def _table_fake_quant(x: Tensor, keep: Tensor | None, levels: Tensor, encode: Encoder,
                      key: _TableKey) -> tuple[Tensor, Tensor, int]:
    """Forward of the table-decoded families (AGQ, LNQ, HLUQ): the fused kernel, or over cache-sized
    slices codes from ``encode`` and values from ``levels``; QDrop's kept elements copied back. Returns the
    contiguous input, the output and the slice row (for the backward)."""
    x = x.contiguous()
    row = _slice_row(x, None)
    thresholds = _native_thresholds(x, key, encode, levels)
    if thresholds is not None:
        return x, native.table(x, thresholds, levels, keep), row
    out = torch.empty_like(x)

    def fill(x_p: Tensor, keep_p: Tensor | None, out_p: Tensor) -> None:
        _lookup(levels, encode(x_p, out_p), into=out_p)
        _keep_values(keep_p, x_p, out_p)

    _fill_slices(fill, [x, keep, out], row)
    return x, out, row


class _FakeQuantAGQ(torch.autograd.Function):
    """With ``k`` straight-through, ``y = s*2^(-k/tau)`` has ``dy/dx = y/x`` and ``dy/ds = 0`` on the grid;
    values clipped to ``s`` (``k < 0``) have ``dy/ds = 1``; underflows to 0 have no gradient. ``keep``: QDrop
    (see ``_FakeQuantUniform``). Forward: the shared encoder and table; backward: ``-k`` recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, tau: float, bits: int, keep: Tensor | None) -> Tensor:
        levels = _levels(_decode_agq, bits, x.device, scale, tau, bits)
        x, out, ctx.row = _table_fake_quant(x, keep, levels, _agq_encoder(scale, tau, bits),
                                            _agq_key(scale, tau, bits))
        ctx.tau, ctx.log2_scale = tau, _item(torch.log2(scale))
        ctx.save_for_backward(x, out, keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep = ctx.saved_tensors
        tau, log2_scale, need_s = ctx.tau, ctx.log2_scale, ctx.needs_input_grad[1]
        if ctx.row == 1 and native.usable(x):
            grad_x, ds = native.agq_backward(x, out, keep, grad, _log_clip(log2_scale, tau),
                                             ctx.needs_input_grad[0])
            return grad_x, _float32(ds) if need_s else None, None, None, None

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> _Derivatives:
            minus_k = torch.clamp(x_p, min=_LOG_FLOOR).log2_().sub_(log2_scale).mul_(tau).round_()
            # on the grid (k >= 0; y = 0 for code 0 and for x <= 0, where the clamp keeps the ratio finite)
            slope = torch.div(out_p, torch.clamp(x_p, min=_LOG_FLOOR))
            slope.mul_(torch.le(minus_k, 0.0, out=torch.empty_like(slope)))
            clipped = torch.gt(minus_k, 0.0, out=minus_k) if need_s else None  # k < 0 implies x > 0
            return _keep_derivatives(keep_p, slope, [clipped])

        grad_x, (grad_s,) = _sliced_backward(derivatives, grad, [x, out, keep], ctx.row, None,
                                             ctx.needs_input_grad[0], [need_s])
        return grad_x, grad_s, None, None, None


def _agq_scale(scale: Tensor | float, tau: float, bits: int, device: torch.device) -> Tensor:
    _check_bits(bits)
    if not tau > 0:
        raise ValueError(f"AGQ: tau must be > 0, got {tau}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
    _check_positive("AGQ scale", scale)
    return scale


@torch.no_grad()
def quantize_agq(x: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """Log codes with base ``2^(1/tau)``: 0 <-> 0, ``c >= 1`` <-> ``scale*2^((c-(L-1))/tau)``.

    ``k = round(-tau*log2(x/scale))``; ``k < 0`` clips to ``scale``; ``k >= L-1`` (and ``x <= 0``) -> code 0.
    Levels below float32's smallest normal number (``2^-126``; only reachable with very fine bases, e.g.
    log2 at 7-8 bits) cannot be represented and do not round-trip.
    """
    scale = _agq_scale(scale, tau, bits, x.device)
    return _agq_encoder(scale, float(tau), bits)(x.float(), _codes_buffer(x)).to(torch.int32)


def dequantize_agq(codes: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """Decode AGQ codes."""
    scale = _agq_scale(scale, tau, bits, codes.device)
    return _lookup(_levels(_decode_agq, bits, codes.device, scale, tau, bits), codes)


def fake_quant_agq(x: Tensor, scale: Tensor, tau: float, bits: int, keep: Tensor | None = None) -> Tensor:
    """AGQ fake-quant; STE gradients reach ``x`` and ``scale`` (only through clipped values). ``keep``:
    QDrop, as in ``fake_quant_uniform``."""
    scale = _agq_scale(scale, tau, bits, x.device)
    if keep is not None and not _needs_grad(x, scale):
        return torch.where(_check_keep(keep, x), x, fake_quant_agq(x, scale, tau, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, scale):
        levels = _levels(_decode_agq, bits, x.device, scale, tau, bits)
        return _fake_quant_values(_agq_encoder(scale, float(tau), bits), levels, x.float(),
                                  _agq_key(scale, float(tau), bits))
    return _FakeQuantAGQ.apply(x.float(), scale, float(tau), bits, keep)


def quantize_log2(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Power-of-two codes (AGQ with ``tau = 1``)."""
    return quantize_agq(x, scale, 1.0, bits)


def dequantize_log2(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Decode power-of-two codes (AGQ with ``tau = 1``)."""
    return dequantize_agq(codes, scale, 1.0, bits)


def fake_quant_log2(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Power-of-two fake-quant (AGQ with ``tau = 1``)."""
    return fake_quant_agq(x, scale, 1.0, bits)


# ---------------------------------------------------------------------------------------------------------
# log-transform nonlinear quantization (LNQ)


def _lnq_encoder(clip: Tensor, alpha: Tensor, bits: int) -> Encoder:
    """The LNQ encoder (float codes ``round(ln(1+a*x)/ln(1+a*clip)*(L-1))``, ``x`` clipped to ``[0, clip]``),
    shared by ``quantize_lnq`` and the fake-quants so that they agree bit for bit: the denominator is
    computed once per call and the clip is one clamp."""
    top = 2**bits - 1
    clip_f, alpha_f, denom = _item(clip), _item(alpha), _item(torch.log1p(alpha * clip))

    def encode(x: Tensor, out: Tensor) -> Tensor:
        return torch.clamp(x, 0.0, clip_f, out=out).mul_(alpha_f).log1p_().div_(denom).mul_(top).round_()

    return encode


def _lnq_key(clip: Tensor, alpha: Tensor, bits: int) -> _TableKey:
    return ("lnq", _item(clip), _item(alpha), bits)


def _decode_lnq(code: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    return torch.expm1(code / top * torch.log1p(alpha * clip)) / alpha


class _FakeQuantLNQ(torch.autograd.Function):
    """With ``c = round(t*(L-1))`` straight-through, ``t = ln(1+a*x)/D``, ``D = ln(1+a*clip)`` and
    ``y = (exp(c*D/(L-1)) - 1)/a``: ``dy/dx = (1+a*y)/(1+a*x)`` for ``0 <= x <= clip``, and
    ``dy/dclip = (1+a*y)/(1+a*clip) * (c/(L-1) - t + [x > clip])``. ``keep``: QDrop (see
    ``_FakeQuantUniform``). Forward: the shared encoder and table; backward: ``c`` and ``t`` recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, alpha: Tensor, bits: int, keep: Tensor | None) -> Tensor:
        levels = _levels(_decode_lnq, bits, x.device, clip, alpha, bits)
        encode = _lnq_encoder(clip, alpha, bits)
        x, out, ctx.row = _table_fake_quant(x, keep, levels, encode, _lnq_key(clip, alpha, bits))
        ctx.encode, ctx.top = encode, 2**bits - 1
        ctx.save_for_backward(x, out, keep, clip, alpha)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, clip, alpha = ctx.saved_tensors
        clip_f, alpha_f, depth = _item(clip), _item(alpha), _item(torch.log1p(alpha * clip))
        growth_clip, need_clip = _item(alpha * clip + 1.0), ctx.needs_input_grad[1]

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> _Derivatives:
            growth = torch.mul(out_p, alpha_f).add_(1.0)
            # inside [0, clip]; outside, the denominator is kept finite and the slope masked
            inside = torch.ge(x_p, 0.0, out=torch.empty_like(x_p))
            inside.mul_(torch.le(x_p, clip_f, out=torch.empty_like(x_p)))
            slope = torch.div(growth, torch.clamp(x_p, min=0.0).mul_(alpha_f).add_(1.0)).mul_(inside)
            dclip = None
            if need_clip:
                t = torch.minimum(x_p, clip).clamp_(min=0.0).mul_(alpha_f).log1p_().div_(depth)
                code = ctx.encode(x_p, inside)  # the mask's storage, no longer needed
                dclip = code.div_(ctx.top).sub_(t).add_(torch.gt(x_p, clip_f, out=t))
                dclip.mul_(growth.div_(growth_clip))
            return _keep_derivatives(keep_p, slope, [dclip])

        grad_x, (grad_clip,) = _sliced_backward(derivatives, grad, [x, out, keep], ctx.row, None,
                                                ctx.needs_input_grad[0], [need_clip])
        return grad_x, grad_clip, None, None, None


def _lnq_params(clip: Tensor | float, alpha: Tensor | float, bits: int, device: torch.device):
    _check_bits(bits)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=device)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=device)
    _check_positive("LNQ clip", clip)
    _check_positive("LNQ alpha", alpha)
    return clip, alpha


@torch.no_grad()
def quantize_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """LNQ codes ``round(ln(1+a*x)/ln(1+a*clip)*(L-1))``, ``x`` clipped to ``[0, clip]``: exactly L codes."""
    clip, alpha = _lnq_params(clip, alpha, bits, x.device)
    return _lnq_encoder(clip, alpha, bits)(x.float(), _codes_buffer(x)).to(torch.int32)


def dequantize_lnq(codes: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Decode LNQ codes: ``(exp(c/(L-1)*ln(1+a*clip)) - 1)/a``."""
    clip, alpha = _lnq_params(clip, alpha, bits, codes.device)
    return _lookup(_levels(_decode_lnq, bits, codes.device, clip, alpha, bits), codes)


def fake_quant_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int, keep: Tensor | None = None) -> Tensor:
    """LNQ fake-quant; STE gradients reach ``x`` (inside ``[0, clip]``) and ``clip``; ``alpha`` is fixed.
    ``keep``: QDrop, as in ``fake_quant_uniform``."""
    clip, alpha = _lnq_params(clip, alpha, bits, x.device)
    if alpha.requires_grad:
        raise ValueError("fake_quant_lnq: alpha is not learnable; pass it detached")
    if keep is not None and not _needs_grad(x, clip):
        return torch.where(_check_keep(keep, x), x, fake_quant_lnq(x, clip, alpha, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, clip):
        levels = _levels(_decode_lnq, bits, x.device, clip, alpha, bits)
        return _fake_quant_values(_lnq_encoder(clip, alpha, bits), levels, x.float(),
                                  _lnq_key(clip, alpha, bits))
    return _FakeQuantLNQ.apply(x.float(), clip, alpha, bits, keep)


# ---------------------------------------------------------------------------------------------------------
# hybrid log-uniform quantization (HLUQ)


def _hluq_encoder(x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Encoder:
    """The HLUQ encoder (float codes), shared by ``quantize_hluq`` and the fake-quants so that they agree bit
    for bit. ``u = x - x_min``; log code ``clamp(n_log-1 + round(log2(u) - log2(s1)), 0, n_log-1)`` with
    ``log2(u)`` floored at ``_LOG_FLOOR`` (``n_log-1-k``, rounding half to even being odd-symmetric); above
    the region switch ``u > s1 + s2/2`` the uniform step ``j = clamp(round((u - s1)/s2), 1, L-n_log)`` is
    added. Both regions are encoded for every element with no branch: above the switch (``u > s1``) the
    clamped log code is always ``n_log-1``, so ``j`` is added under the float 0/1 region mask (one
    ``addcmul``; boolean selects are several times slower on CPU). The scalars ``log2(s1)`` and the switch
    are computed once per call; the ``u > 0`` mask is skipped when the floor, where every ``u <= 0`` lands,
    already has code 0 (any ``s1`` above about ``2^-118``).
    """
    top, steps = n_log - 1, 2**bits - n_log
    x_min_f, s1_f, s2_f = _item(x_min), _item(s1), _item(s2)
    log2_s1, switch = _item(torch.log2(s1)), _item(s1 + s2 / 2)

    def log_code(u: Tensor, out: Tensor) -> Tensor:
        return torch.clamp(u, min=_LOG_FLOOR, out=out).log2_().sub_(log2_s1).round_().add_(top).clamp_(0, top)

    floor_masked = _floor_code(log_code, x_min.device) != 0

    def encode(x: Tensor, out: Tensor) -> Tensor:
        u = torch.sub(x, x_min_f, out=torch.empty_like(out))
        code = log_code(u, out)
        mask = torch.empty_like(out)
        if floor_masked:
            code.mul_(torch.gt(u, 0.0, out=mask))
        in_uniform = torch.gt(u, switch, out=mask)
        return code.addcmul_(u.sub_(s1_f).div_(s2_f).round_().clamp_(1, steps), in_uniform)

    return encode


def _hluq_key(x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> _TableKey:
    return ("hluq", _item(x_min), _item(s1), _item(s2), n_log, bits)


def _decode_hluq(code: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int) -> Tensor:
    log_level = s1 * torch.exp2(torch.clamp(code, max=n_log - 1) - (n_log - 1))
    log_level = torch.where(code == 0, torch.zeros_like(log_level), log_level)
    uniform_level = s1 + (code - (n_log - 1)) * s2
    return torch.where(code >= n_log, uniform_level, log_level) + x_min


class _FakeQuantHLUQ(torch.autograd.Function):
    """Straight-through derivatives of the decoder, ``u = x - x_min``:
    uniform region on the grid (``1 <= round(v) <= L-n_log``): ``dy/dx = 1``, ``dy/ds2 = round(v) - v``;
    uniform region clipped: ``dy/ds1 = 1``, ``dy/ds2 = j``; log region on the grid (``0 <= k < n_log-1``):
    ``dy/dx = (y - x_min)/u`` (``s1`` cancels); log region clipped to ``s1`` (``k < 0``): ``dy/ds1 = 1``;
    underflow to ``x_min``: none. Always ``dy/dx_min = 1 - dy/dx``. ``keep``: QDrop (see
    ``_FakeQuantUniform``). Forward: the shared encoder and table; backward: the region, ``v``, ``round(v)``
    and ``-k`` recomputed with the encoder's scalars, the masks as float 0/1 products."""

    @staticmethod
    def forward(ctx, x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int,
                keep: Tensor | None) -> Tensor:
        levels = _levels(_decode_hluq, bits, x.device, x_min, s1, s2, n_log)
        encode = _hluq_encoder(x_min, s1, s2, n_log, bits)
        x, out, ctx.row = _table_fake_quant(x, keep, levels, encode, _hluq_key(x_min, s1, s2, n_log, bits))
        ctx.steps = 2**bits - n_log
        ctx.save_for_backward(x, out, keep, x_min, s1, s2)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, x_min, s1, s2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        x_min_f, s1_f, s2_f, steps = _item(x_min), _item(s1), _item(s2), ctx.steps
        log2_s1, switch = _item(torch.log2(s1)), _item(s1 + s2 / 2)
        if ctx.row == 1 and native.usable(x):
            grad_x, ds1, ds2, dx_min = native.hluq_backward(x, out, keep, grad, x_min_f, s1_f, s2_f, switch,
                                                            steps, _log_clip(log2_s1, 1.0), need[0])
            grad_x_min = _float32(dx_min).reshape(x_min.shape) if need[1] else None
            return (grad_x, grad_x_min, _float32(ds1) if need[2] else None,
                    _float32(ds2) if need[3] else None, None, None, None)

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> _Derivatives:
            u = torch.sub(x_p, x_min_f)
            uniform = torch.gt(u, switch, out=torch.empty_like(u))
            v = torch.sub(u, s1_f).div_(s2_f)
            rounded = torch.round(v)
            step = torch.clamp(rounded, 1, steps)
            uniform_in = torch.eq(step, rounded, out=torch.empty_like(u)).mul_(uniform)
            clipped = torch.sub(uniform, uniform_in)
            minus_k = torch.clamp(u, min=_LOG_FLOOR).log2_().sub_(log2_s1).round_()
            # log region on the grid: k >= 0 (y - x_min = 0 for code 0, where the clamp keeps the ratio
            # finite)
            log_in = torch.le(minus_k, 0.0, out=torch.empty_like(u))
            log_in.addcmul_(log_in, uniform, value=-1.0)
            ratio = torch.sub(out_p, x_min_f).div_(u.clamp_(min=_LOG_FLOOR))
            slope = torch.addcmul(uniform_in, log_in, ratio, out=ratio)
            ds1 = ds2 = None
            if need[2]:  # uniform clipped, or log clipped (k < 0, which implies u > 0)
                log_clipped = torch.gt(minus_k, 0.0, out=minus_k)
                ds1 = torch.add(clipped, log_clipped).addcmul_(log_clipped, uniform, value=-1.0)
            if need[3]:  # round(v) - v on the grid, j clipped, 0 in the log region
                ds2 = torch.mul(clipped, step, out=step).addcmul_(uniform_in, rounded.sub_(v))
            return _keep_derivatives(keep_p, slope, [ds1, ds2])

        grad_x, (grad_s1, grad_s2) = _sliced_backward(derivatives, grad, [x, out, keep], ctx.row, None,
                                                      need[0] or need[1], need[2:4])
        grad_x_min = _sum_like(grad - grad_x, x_min) if need[1] else None
        return grad_x if need[0] else None, grad_x_min, grad_s1, grad_s2, None, None, None


def _hluq_params(x_min, s1, s2, n_log: int, bits: int, device: torch.device):
    _check_bits(bits)
    if not 2 <= n_log <= 2**bits - 1:
        raise ValueError(f"HLUQ: n_log must be in [2, {2**bits - 1}] at {bits} bits, got {n_log}")
    x_min, s1, s2 = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (x_min, s1, s2))
    _check_positive("HLUQ s1", s1)
    _check_positive("HLUQ s2", s2)
    if x_min.numel() != 1 or not math.isfinite(_item(x_min)):
        got = x_min.detach().flatten()[:4].tolist()
        raise ValueError(f"HLUQ x_min must be a single finite value, got {got}")
    return x_min, s1, s2


@torch.no_grad()
def quantize_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """HLUQ codes: ``[0, n_log)`` log region below the breakpoint ``s1`` (code 0 <-> 0), ``[n_log, L)``
    uniform steps of ``s2`` above it; values past the top clip to the top level."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    return _hluq_encoder(x_min, s1, s2, n_log, bits)(x.float(), _codes_buffer(x)).to(torch.int32)


def dequantize_hluq(codes: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """Decode HLUQ codes."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, codes.device)
    return _lookup(_levels(_decode_hluq, bits, codes.device, x_min, s1, s2, n_log), codes)


def fake_quant_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int,
                    keep: Tensor | None = None) -> Tensor:
    """HLUQ fake-quant; STE gradients reach ``x``, ``x_min``, ``s1`` and ``s2``. ``keep``: QDrop, as in
    ``fake_quant_uniform``."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    if keep is not None and not _needs_grad(x, x_min, s1, s2):
        return torch.where(_check_keep(keep, x), x, fake_quant_hluq(x, x_min, s1, s2, n_log, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, x_min, s1, s2):
        levels = _levels(_decode_hluq, bits, x.device, x_min, s1, s2, n_log)
        return _fake_quant_values(_hluq_encoder(x_min, s1, s2, n_log, bits), levels, x.float(),
                                  _hluq_key(x_min, s1, s2, n_log, bits))
    return _FakeQuantHLUQ.apply(x.float(), x_min, s1, s2, n_log, bits, keep)


# ---------------------------------------------------------------------------------------------------------
# argument checks


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

