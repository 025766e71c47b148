"""The uniform affine family: encoder (``quantize_uniform``), decoder (``dequantize_uniform``) and
fake-quant (``fake_quant_uniform``) with its autograd Function.

The uniform fake-quant is bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
(it multiplies by the float32 reciprocal of the scale and rounds half to even, as they do); its gradient for
``scale`` is LSQ's (wrap the scale in ``grad_scale`` for LSQ's factor).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import engine
from .grid import _check_keep, _item, _needs_grad, _norm_axis, view_along


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
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, out: Tensor | None = None,
    grid: _Grid | None = None,
) -> Tensor:
    """Codes minus the zero point, ``clamp(round(x*(1/s)), qmin-z, qmax-z)`` (equal, in exact integer
    float arithmetic, to ``clamp(round(x*(1/s)) + z, qmin, qmax) - z``), with torch's float32 reciprocal and
    half-to-even rounding. ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``;
    ``out`` receives the codes; ``grid``: ``_grid``'s result when the caller has it already (slices of one
    tensor)."""
    inv, lo, hi = grid if grid is not None else _grid(scale, zero_point, qmin, qmax)
    return torch.mul(x, inv, out=out).round_().clamp_(lo, hi)


def _scale_codes_(codes: Tensor, scale: Tensor | float) -> Tensor:
    """Relative codes -> values, in place. The + 0.0 turns the -0.0 that rounding leaves for x in (-s/2, 0)
    into +0.0, as torch's integer arithmetic (and dequantize_uniform) produce; an in-place add is cheaper
    than a fused addcmul here."""
    return codes.add_(0.0).mul_(scale)


class _FakeQuantUniform(torch.autograd.Function):
    """Uniform fake-quant; straight-through gradient for x, LSQ gradient for scale. ``keep`` (QDrop): those
    elements pass through as ``x`` with identity gradient and give the scale none. Saves ``x``, the output
    and ``keep``; the backward recomputes the in-range mask slice by slice (see
    ``engine.sliced_backward``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None,
                keep: Tensor | None):
        x = x.contiguous()
        row = engine.slice_row(x, axis)
        if row:  # the parameters of one slice: a scalar, or one per element of a row
            scale_b, zp_b = (t.float().reshape(-1 if row > 1 else ()) for t in (scale, zero_point))
        else:
            scale_b, zp_b = _broadcast_qparams(x, scale, zero_point, axis)
        grid = _grid(scale_b, zp_b, qmin, qmax)

        def fill(x_p: Tensor, keep_p: Tensor | None, out_p: Tensor) -> None:
            _scale_codes_(_relative_codes(x_p, scale_b, zp_b, qmin, qmax, out_p, grid), scale_b)
            engine.keep_values(keep_p, x_p, out_p)

        out = engine.elementwise(fill, x, keep, row, lambda: engine.native_uniform(x, *grid, scale_b, keep))
        ctx.grid, ctx.row, ctx.axis = (scale_b, zp_b, qmin, qmax), row, axis
        ctx.save_for_backward(x, out, keep, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, scale = ctx.saved_tensors
        scale_b, zp_b, qmin, qmax = ctx.grid
        grid = _grid(scale_b, zp_b, qmin, qmax)
        need_x, need_s = ctx.needs_input_grad[:2]

        def fused() -> tuple[Tensor | None, list[float]]:
            grad_x, ds = engine.native_uniform_backward(x, out, keep, grad, *grid, need_x)
            return grad_x, [ds]

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> engine.Derivatives:
            # in range (the clamp of _relative_codes leaves the rounded code as it is; a float 0/1 mask, five
            # times cheaper than a boolean one): d x_hat/dx = 1, d x_hat/ds = (x_hat - x)/s (= round(x/s) -
            # x/s); clipped: 0 and x_hat/s (= the clamp bound minus z); i.e. (x_hat - x*mask)/s, the 1/s
            # applied after the reduction
            inv, lo, hi = grid
            unclamped = torch.mul(x_p, inv).round_()
            inside = torch.eq(torch.clamp(unclamped, lo, hi), unclamped, out=unclamped)
            dscale = torch.sub(out_p, torch.mul(x_p, inside)) if need_s else None
            return engine.keep_derivatives(keep_p, inside, [dscale])

        grad_x, (sums,) = engine.backward(derivatives, grad, [x, out, keep], ctx.row, ctx.axis, need_x,
                                          [need_s], fused)
        grad_scale_ = None
        if need_s:
            inverse = 1.0 / scale.reshape(-1 if ctx.axis is not None else ())
            grad_scale_ = (sums * inverse).reshape(scale.shape)
        return grad_x, grad_scale_, None, None, None, None, None


def _values(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """The fake-quant without autograd. Per tensor the grid is Python floats (the same float32 values, the
    cheapest scalar operands) and the engine may slice or fuse; per channel one broadcast pass."""
    if axis is None:
        s, z = _item(scale), _item(zero_point)
        grid = (_item(1.0 / scale), qmin - z, qmax - z)

        def fill(part: Tensor, into: Tensor) -> None:
            _scale_codes_(_relative_codes(part, scale, zero_point, qmin, qmax, into, grid), s)

        scale_0 = scale.reshape(())
        fused_grid = _grid(scale_0, zero_point.float().reshape(()), qmin, qmax)
        return engine.values(fill, x, lambda: engine.native_uniform(x, *fused_grid, scale_0, None))
    scale_b, zp_b = _broadcast_qparams(x, scale, zero_point, axis)
    return engine.values(lambda part, into: _scale_codes_(
        _relative_codes(part, scale_b, zp_b, qmin, qmax, into), scale_b), x, sliceable=False)


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
        return _values(x.float(), scale.float(), zero_point, qmin, qmax, ax).to(x.dtype)
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
    return _relative_codes(x, scale_b, zp_b, qmin, qmax).add_(zp_b).to(torch.int32)


def dequantize_uniform(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """``(codes - z) * s`` in float32."""
    scale, zero_point = _broadcast_qparams(codes, scale, zero_point, axis)
    return (codes.float() - zero_point) * scale
