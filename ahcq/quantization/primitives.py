"""Stateless quantization math: the only place where a quantization formula lives.

Every family has an encoder (``quantize_*`` -> int32 codes), a decoder (``dequantize_*``) and a fake-quant
(``fake_quant_*``) with ``fake_quant(x) == dequantize(quantize(x))`` bit for bit: the fake-quant runs the
same encoder and decodes through the same code (uniform: the same integer-valued float ops; log families:
the same decode table), and its autograd Function supplies the straight-through gradients for ``x`` and the
learnable parameters, saving one or two tensors instead of a graph of intermediates.

The uniform fake-quant is bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
(it multiplies by the float32 reciprocal of the scale and rounds half to even, as they do); its gradient for
``scale`` is LSQ's (wrap the scale in ``grad_scale`` for LSQ's factor).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
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
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
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


_Grid = tuple[Tensor, Tensor | float, Tensor | float]


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


def _scale_codes_(codes: Tensor, scale: Tensor) -> Tensor:
    """Relative codes -> values, in place. The + 0.0 turns the -0.0 that rounding leaves for x in (-s/2, 0)
    into +0.0, as torch's integer arithmetic (and dequantize_uniform) produce; an in-place add is cheaper
    than a fused addcmul here."""
    return codes.add_(0.0).mul_(scale)


class _FakeQuantUniform(torch.autograd.Function):
    """Uniform fake-quant; straight-through gradient for x, LSQ gradient for scale."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out, mask = _fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, need_grad)
        ctx.axis = axis
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(mask, x, out, scale)
        else:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        mask = ctx.saved_tensors[0]
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_scale_ = None
        if ctx.needs_input_grad[1]:
            _, x, out, scale = ctx.saved_tensors
            # d x_hat / ds with STE: (x_hat - x)/s in range (= round(x/s) - x/s), x_hat/s (= the clamp bound
            # minus z) when clipped; i.e. (x_hat - x*mask)/s, with 1/s applied after the reduction.
            dscale = torch.mul(x, mask)
            torch.sub(out, dscale, out=dscale).mul_(grad)
            if ctx.axis is None:
                grad_scale_ = (dscale.sum() * (1.0 / scale.reshape(()))).reshape(scale.shape)
            else:
                dims = [d for d in range(x.dim()) if d != ctx.axis]
                grad_scale_ = dscale.sum(dim=dims) * (1.0 / scale)
        return grad_x, grad_scale_, None, None, None, None


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
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """``s*(clamp(round(x*(1/s)) + z, qmin, qmax) - z)``, bit-exact with torch's fake-quant ops.

    Gradients: straight-through for ``x`` inside the range, LSQ for ``scale`` (wrap it in ``grad_scale``
    for the LSQ factor). The zero point is not learnable.
    """
    ax = _uniform_args(x, scale, zero_point, qmin, qmax, axis)
    if zero_point.requires_grad:
        raise ValueError("fake_quant_uniform: zero_point is not learnable; pass it detached")
    if not _needs_grad(x, scale):
        xf, scale = x.float(), scale.float()
        if xf.device.type == "cpu" and ax is None:
            scale_b, zp_b = _broadcast_qparams(xf, scale, zero_point, None)
            grid = _grid(scale_b, zp_b, qmin, qmax)

            def fill(part: Tensor, into: Tensor) -> None:
                _scale_codes_(_relative_codes(part, scale_b, zp_b, qmin, qmax, False, into, grid)[0], scale_b)

            out = _sliced(fill, xf)
        else:
            out = _fake_quant_forward(xf, scale, zero_point, qmin, qmax, ax, need_mask=False)[0]
        return out.to(x.dtype)
    if x.dtype != torch.float32:
        return _FakeQuantUniform.apply(x.float(), scale.float(), zero_point, qmin, qmax, ax).to(x.dtype)
    return _FakeQuantUniform.apply(x, scale.float(), zero_point, qmin, qmax, ax)


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


def _sliced(fill: Callable[[Tensor, Tensor], object], x: Tensor) -> Tensor:
    """``fill(x_part, out_part)`` over slices of at most ``_SLICE`` elements of the flattened ``x`` (CPU,
    no autograd). The many elementwise passes of an encoder then run on cache-resident temporaries, which
    the allocator reuses instead of mapping fresh pages (page faults cost as much as the arithmetic); 2^16
    elements measured best, 2^15 and 2^17 within 10 %. A permuted dense tensor (a transposed view) is walked
    in memory order and the result has its layout, as torch's elementwise ops give; other layouts are copied
    first."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    dense = x.permute(order)
    if not dense.is_contiguous():
        order, dense = list(range(x.dim())), x.contiguous()
    out = torch.empty_like(dense)
    flat_x, flat_out = dense.view(-1), out.view(-1)
    for start in range(0, flat_x.numel(), _SLICE):
        fill(flat_x[start:start + _SLICE], flat_out[start:start + _SLICE])
    return out.permute(sorted(range(x.dim()), key=order.__getitem__))


def _fake_quant_values(encode: Callable[[Tensor], Tensor], levels: Tensor, x: Tensor) -> Tensor:
    """A table-decoded fake-quant without autograd: ``encode`` (float codes in a fresh tensor it owns) then
    the lookup, into the codes' own storage; on CPU slice by slice (``_sliced``)."""
    if x.device.type != "cpu":
        code = encode(x)
        return _lookup(levels, code, into=code)
    return _sliced(lambda part, out: _lookup(levels, encode(part), into=out), x)


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record this call; when not, the fake-quants skip their autograd Function
    and compute only the values (the same encoder and decoder, so the same bits)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sum_like(t: Tensor, param: Tensor) -> Tensor:
    """Reduce a per-element gradient to the shape of the (broadcast) parameter it belongs to."""
    return t.sum_to_size(param.shape) if param.dim() else t.sum()


# ---------------------------------------------------------------------------------------------------------
# adaptive-granularity log (AGQ) and power-of-two (log2 = AGQ with tau = 1)
#
# The log families' fake-quants are autograd Functions: the forward is the encoder followed by the decoder
# (so it equals dequantize(quantize(x)) bit for bit) and the backward is the straight-through derivative of
# the decoder written out, which saves one or two tensors instead of the graph of every intermediate.


def _encode_agq(x: Tensor, scale: Tensor, tau: float, bits: int, aux: bool) -> tuple[Tensor, Tensor | None]:
    """Float codes and, when ``aux`` (the gradients need it), the rounded exponent ``k`` before clipping;
    without ``aux`` the codes overwrite ``k``."""
    top = 2**bits - 1
    k = torch.clamp(x, min=_LOG_FLOOR).log2_().sub_(torch.log2(scale)).mul_(-tau).round_()
    # top - k clamped to [0, top]: k < 0 clips to the top code, k >= top underflows to 0; x <= 0 -> 0 by a
    # float 0/1 product (a boolean masked fill is several times slower on CPU)
    code = (k.neg() if aux else k.neg_()).add_(top).clamp_(0, top)
    return code.mul_(torch.gt(x, 0.0, out=torch.empty_like(code))), (k if aux else None)


def _decode_agq(code: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    top = 2**bits - 1
    level = scale * torch.exp2((code - top) / tau)
    return torch.where(code == 0, torch.zeros_like(level), level)


class _FakeQuantAGQ(torch.autograd.Function):
    """With ``k`` straight-through, ``y = s*2^(-k/tau)`` has ``dy/dx = y/x`` and ``dy/ds = 0`` on the grid;
    values clipped to ``s`` (``k < 0``) have ``dy/ds = 1``; underflows to 0 have no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
        code, k = _encode_agq(x, scale, tau, bits, aux=True)
        out = _lookup(_levels(_decode_agq, bits, x.device, scale, tau, bits), code)
        slope = None
        if ctx.needs_input_grad[0]:
            off_grid = code == 0
            off_grid |= k < 0
            slope = torch.div(out, x).masked_fill_(off_grid, 0.0)
        clipped = (k < 0) & (x > 0) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(slope, clipped, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        slope, clipped, scale = ctx.saved_tensors
        grad_x = grad * slope if ctx.needs_input_grad[0] else None
        grad_s = _sum_like(grad * clipped, scale) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


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
    return _encode_agq(x.float(), scale, tau, bits, aux=False)[0].to(torch.int32)


def dequantize_agq(codes: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """Decode AGQ codes."""
    scale = _agq_scale(scale, tau, bits, codes.device)
    return _lookup(_levels(_decode_agq, bits, codes.device, scale, tau, bits), codes)


def fake_quant_agq(x: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """AGQ fake-quant; STE gradients reach ``x`` and ``scale`` (only through clipped values)."""
    scale = _agq_scale(scale, tau, bits, x.device)
    if not _needs_grad(x, scale):
        levels = _levels(_decode_agq, bits, x.device, scale, tau, bits)
        return _fake_quant_values(lambda t: _encode_agq(t, scale, float(tau), bits, aux=False)[0], levels,
                                  x.float())
    return _FakeQuantAGQ.apply(x.float(), scale, float(tau), bits)


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


def _encode_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int, aux: bool) -> tuple[Tensor, Tensor | None]:
    """Float codes and, when ``aux`` (the gradients need it), the transformed value ``t`` in ``[0, 1]``
    before rounding; without ``aux`` the codes overwrite ``t``."""
    top = 2**bits - 1
    t = torch.minimum(x, clip).clamp_(min=0.0).mul_(alpha).log1p_().div_(torch.log1p(alpha * clip))
    return (torch.mul(t, top) if aux else t.mul_(top)).round_(), (t if aux else None)


def _decode_lnq(code: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    return torch.expm1(code / top * torch.log1p(alpha * clip)) / alpha


class _FakeQuantLNQ(torch.autograd.Function):
    """With ``c = round(t*(L-1))`` straight-through, ``t = ln(1+a*x)/D``, ``D = ln(1+a*clip)`` and
    ``y = (exp(c*D/(L-1)) - 1)/a``: ``dy/dx = (1+a*y)/(1+a*x)`` for ``0 <= x <= clip``, and
    ``dy/dclip = (1+a*y)/(1+a*clip) * (c/(L-1) - t + [x > clip])``."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
        code, t = _encode_lnq(x, clip, alpha, bits, aux=True)
        out = _lookup(_levels(_decode_lnq, bits, x.device, clip, alpha, bits), code)
        growth = alpha * out + 1.0
        slope = dclip = None
        if ctx.needs_input_grad[0]:
            inside = (x >= 0) & (x <= clip)
            slope = torch.where(inside, growth / (alpha * x + 1.0), torch.zeros_like(out))
        if ctx.needs_input_grad[1]:
            dclip = growth / (alpha * clip + 1.0) * (code / (2**bits - 1) - t + (x > clip).float())
        ctx.save_for_backward(slope, dclip, clip)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        slope, dclip, clip = ctx.saved_tensors
        grad_x = grad * slope if ctx.needs_input_grad[0] else None
        grad_clip = _sum_like(grad * dclip, clip) if ctx.needs_input_grad[1] else None
        return grad_x, grad_clip, None, None


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
    return _encode_lnq(x.float(), clip, alpha, bits, aux=False)[0].to(torch.int32)


def dequantize_lnq(codes: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Decode LNQ codes: ``(exp(c/(L-1)*ln(1+a*clip)) - 1)/a``."""
    clip, alpha = _lnq_params(clip, alpha, bits, codes.device)
    return _lookup(_levels(_decode_lnq, bits, codes.device, clip, alpha, bits), codes)


def fake_quant_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """LNQ fake-quant; STE gradients reach ``x`` (inside ``[0, clip]``) and ``clip``; ``alpha`` is fixed."""
    clip, alpha = _lnq_params(clip, alpha, bits, x.device)
    if alpha.requires_grad:
        raise ValueError("fake_quant_lnq: alpha is not learnable; pass it detached")
    if not _needs_grad(x, clip):
        levels = _levels(_decode_lnq, bits, x.device, clip, alpha, bits)
        return _fake_quant_values(lambda t: _encode_lnq(t, clip, alpha, bits, aux=False)[0], levels,
                                  x.float())
    return _FakeQuantLNQ.apply(x.float(), clip, alpha, bits)


# ---------------------------------------------------------------------------------------------------------
# hybrid log-uniform quantization (HLUQ)


def _encode_hluq(
    x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int, aux: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Float codes and, when ``aux`` (the gradients need them), the uniform-region mask, the uniform step
    position ``v = (u - s1)/s2``, its rounded value and the rounded log exponent ``k``, both before clipping.

    Both regions are encoded for every element with one ``log2`` and no branch: the log code
    ``clamp(n_log-1-k, 0, n_log-1)`` (0 also for ``u <= 0``) and the uniform code, zeroed outside its region,
    are merged by ``maximum`` (uniform codes are ``>= n_log``, log codes ``< n_log``). Masks are float
    0/1 products, much cheaper on CPU than boolean selects; without ``aux`` every step is in place.
    """
    top = n_log - 1
    u = x - x_min
    log_u = torch.clamp(u, min=_LOG_FLOOR).log2_()
    if aux:
        k = torch.sub(torch.log2(s1), log_u, out=log_u).round_()
        code = k.neg()
    else:  # n_log-1-k as n_log-1 + round(log2(u) - log2(s1)): rounding half to even is odd-symmetric
        k, code = None, log_u.sub_(torch.log2(s1)).round_()
    mask = torch.gt(u, 0.0, out=torch.empty_like(u))
    code.add_(top).clamp_(0, top).mul_(mask)
    in_uniform = torch.gt(u, s1 + s2 / 2, out=torch.empty_like(u) if aux else mask)
    v = torch.sub(u, s1, out=None if aux else u).div_(s2)
    rounded = torch.round(v) if aux else v.round_()
    uniform_code = torch.clamp(rounded, 1, 2**bits - n_log) if aux else rounded.clamp_(1, 2**bits - n_log)
    uniform_code.add_(top).mul_(in_uniform)
    code = torch.maximum(uniform_code, code, out=code)
    if not aux:
        return code, None, None, None, None
    return code, in_uniform.bool(), v, rounded, k


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
    underflow to ``x_min``: none. Always ``dy/dx_min = 1 - dy/dx``."""

    @staticmethod
    def forward(ctx, x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
        code, uniform, v, rounded, k = _encode_hluq(x, x_min, s1, s2, n_log, bits, aux=True)
        out = _lookup(_levels(_decode_hluq, bits, x.device, x_min, s1, s2, n_log), code)
        uniform_in = uniform & (rounded >= 1) & (rounded <= 2**bits - n_log)
        log_in = ~uniform & (code > 0) & (k >= 0)
        slope = ds1 = ds2 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            slope = torch.sub(out, x_min).div_(x - x_min).masked_fill_(~log_in, 0.0)
            slope.masked_fill_(uniform_in, 1.0)
        if ctx.needs_input_grad[2]:
            ds1 = (uniform & ~uniform_in) | (~uniform & (k < 0) & (x > x_min))
        if ctx.needs_input_grad[3]:
            ds2 = torch.where(uniform_in, rounded.sub_(v), code - (n_log - 1)).masked_fill_(~uniform, 0.0)
        ctx.save_for_backward(slope, ds1, ds2, x_min, s1, s2)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        slope, ds1, ds2, x_min, s1, s2 = ctx.saved_tensors
        grad_x = grad * slope if ctx.needs_input_grad[0] else None
        grad_x_min = grad_s1 = grad_s2 = None
        if ctx.needs_input_grad[1]:
            grad_x_min = _sum_like(grad - (grad_x if grad_x is not None else grad * slope), x_min)
        if ctx.needs_input_grad[2]:
            grad_s1 = _sum_like(grad * ds1, s1)
        if ctx.needs_input_grad[3]:
            grad_s2 = _sum_like(grad * ds2, s2)
        return grad_x, grad_x_min, grad_s1, grad_s2, None, None


def _hluq_params(x_min, s1, s2, n_log: int, bits: int, device: torch.device):
    _check_bits(bits)
    if not 2 <= n_log <= 2**bits - 1:
        raise ValueError(f"HLUQ: n_log must be in [2, {2**bits - 1}] at {bits} bits, got {n_log}")
    x_min, s1, s2 = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (x_min, s1, s2))
    _check_positive("HLUQ s1", s1)
    _check_positive("HLUQ s2", s2)
    if x_min.numel() != 1 or not bool(torch.isfinite(x_min).all()):
        got = x_min.detach().flatten()[:4].tolist()
        raise ValueError(f"HLUQ x_min must be a single finite value, got {got}")
    return x_min, s1, s2


@torch.no_grad()
def quantize_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """HLUQ codes: ``[0, n_log)`` log region below the breakpoint ``s1`` (code 0 <-> 0), ``[n_log, L)``
    uniform steps of ``s2`` above it; values past the top clip to the top level."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    return _encode_hluq(x.float(), x_min, s1, s2, n_log, bits, aux=False)[0].to(torch.int32)


def dequantize_hluq(codes: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """Decode HLUQ codes."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, codes.device)
    return _lookup(_levels(_decode_hluq, bits, codes.device, x_min, s1, s2, n_log), codes)


def fake_quant_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """HLUQ fake-quant; STE gradients reach ``x``, ``x_min``, ``s1`` and ``s2``."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    if not _needs_grad(x, x_min, s1, s2):
        levels = _levels(_decode_hluq, bits, x.device, x_min, s1, s2, n_log)
        return _fake_quant_values(lambda t: _encode_hluq(t, x_min, s1, s2, n_log, bits, aux=False)[0], levels,
                                  x.float())
    return _FakeQuantHLUQ.apply(x.float(), x_min, s1, s2, n_log, bits)


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_positive(what: str, t: Tensor) -> None:
    if t.numel() != 1:
        raise ValueError(f"{what} must be a single value (per-tensor), got shape {tuple(t.shape)}")
    t = t.detach()
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{what} must be finite and > 0, got {t.flatten()[:4].tolist()}")


def _norm_axis(axis: int, x: Tensor) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()

