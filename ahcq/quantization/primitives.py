"""Stateless quantization math: the only place where a quantization formula lives.

Every family has an encoder (``quantize_*`` -> int32 codes), a decoder (``dequantize_*``) and a
fake-quant (``fake_quant_*``). The fake-quant is the decoder applied to the encoder's code computed with
straight-through rounding, through the same float operations, so ``dequantize(quantize(x)) ==
fake_quant(x)`` bit for bit while gradients still reach ``x`` and the learnable parameters.

The uniform fake-quant is bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
(it multiplies by the float32 reciprocal of the scale and rounds half to even, as they do) and computes its
own backward in one autograd node: the straight-through gradient for ``x`` and the LSQ gradient for
``scale``.
"""
from __future__ import annotations

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


def _clip(t: Tensor, lo: float | Tensor | None = None, hi: float | Tensor | None = None) -> Tensor:
    """Clamp whose gradient also passes at the bounds, as in torch's fake-quant kernels (torch.clamp's
    gradient stops there), so a value that rounds onto the end level still counts as in range."""
    if lo is not None:
        t = torch.where(t < lo, lo, t)
    if hi is not None:
        t = torch.where(t > hi, hi, t)
    return t


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


def _relative_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, need_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """Codes minus the zero point, ``clamp(round(x*(1/s)), qmin-z, qmax-z)`` (equal, in exact integer
    float arithmetic, to ``clamp(round(x*(1/s)) + z, qmin, qmax) - z``), with torch's float32 reciprocal and
    half-to-even rounding; and, when ``need_mask``, whether each code was inside the grid before clamping.
    ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``."""
    lo, hi = qmin - zero_point, qmax - zero_point
    if lo.dim() == 0 and lo.device.type == "cpu":
        lo, hi = float(lo), float(hi)  # scalar bounds: the fastest clamp
    unclamped = torch.mul(x, 1.0 / scale).round_()
    if not need_mask:
        return unclamped.clamp_(lo, hi), None
    codes = torch.clamp(unclamped, lo, hi)
    return codes, torch.eq(codes, unclamped)


def _fake_quant_forward(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None, need_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """Fake-quant values and the in-range mask (only when ``need_mask``). On CUDA torch's fused kernel;
    elsewhere the same formula in five vectorised ops, faster than torch's scalar CPU kernels."""
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
    return codes.mul_(scale_b), mask


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


# ---------------------------------------------------------------------------------------------------------
# adaptive-granularity log (AGQ) and power-of-two (log2 = AGQ with tau = 1)


def _encode_agq(x: Tensor, scale: Tensor, tau: float, bits: int, ste: bool) -> Tensor:
    top = 2**bits - 1
    k = -tau * (torch.log2(torch.clamp(x, min=_LOG_FLOOR)) - torch.log2(scale))
    k = round_ste(k) if ste else torch.round(k)
    underflow = (k >= top) | (x <= 0)
    return torch.where(underflow, torch.zeros_like(k), top - _clip(k, lo=0.0))


def _decode_agq(code: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    top = 2**bits - 1
    level = scale * torch.exp2((code - top) / tau)
    return torch.where(code == 0, torch.zeros_like(level), level)


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
    """
    scale = _agq_scale(scale, tau, bits, x.device)
    return _encode_agq(x.float(), scale, tau, bits, ste=False).to(torch.int32)


def dequantize_agq(codes: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """Decode AGQ codes."""
    scale = _agq_scale(scale, tau, bits, codes.device)
    return _decode_agq(codes.float(), scale, tau, bits)


def fake_quant_agq(x: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """AGQ fake-quant; STE gradients reach ``x`` and ``scale`` (only through clipped values)."""
    scale = _agq_scale(scale, tau, bits, x.device)
    return _decode_agq(_encode_agq(x.float(), scale, tau, bits, ste=True), scale, tau, bits)


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


def _encode_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int, ste: bool) -> Tensor:
    top = 2**bits - 1
    t = torch.log1p(alpha * _clip(x, 0.0, clip)) / torch.log1p(alpha * clip) * top
    # + 0.0 turns the code of x = -0.0 into +0.0, the float value of its int32 code
    return (round_ste(t) if ste else torch.round(t)) + 0.0


def _decode_lnq(code: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    return torch.expm1(code / top * torch.log1p(alpha * clip)) / alpha


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
    return _encode_lnq(x.float(), clip, alpha, bits, ste=False).to(torch.int32)


def dequantize_lnq(codes: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Decode LNQ codes: ``(exp(c/(L-1)*ln(1+a*clip)) - 1)/a``."""
    clip, alpha = _lnq_params(clip, alpha, bits, codes.device)
    return _decode_lnq(codes.float(), clip, alpha, bits)


def fake_quant_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """LNQ fake-quant; STE gradients reach ``x`` (inside ``[0, clip]``) and ``clip`` (via clipped values)."""
    clip, alpha = _lnq_params(clip, alpha, bits, x.device)
    return _decode_lnq(_encode_lnq(x.float(), clip, alpha, bits, ste=True), clip, alpha, bits)


# ---------------------------------------------------------------------------------------------------------
# hybrid log-uniform quantization (HLUQ)


def _encode_hluq(
    x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int, ste: bool
) -> Tensor:
    levels = 2**bits
    rnd = round_ste if ste else torch.round
    u = x - x_min
    j = _clip(rnd((u - s1) / s2), 1.0, float(levels - n_log))
    k = _clip(rnd(torch.log2(s1) - torch.log2(torch.clamp(u, min=_LOG_FLOOR))), lo=0.0)
    log_code = torch.where((k >= n_log - 1) | (u <= 0), torch.zeros_like(k), (n_log - 1) - k)
    uniform = (u > s1 + s2 / 2).detach()
    return torch.where(uniform, (n_log - 1) + j, log_code)


def _decode_hluq(code: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int) -> Tensor:
    log_level = s1 * torch.exp2(_clip(code, hi=float(n_log - 1)) - (n_log - 1))
    log_level = torch.where(code == 0, torch.zeros_like(log_level), log_level)
    uniform_level = s1 + (code - (n_log - 1)) * s2
    return torch.where(code >= n_log, uniform_level, log_level) + x_min


def _hluq_params(x_min, s1, s2, n_log: int, bits: int, device: torch.device):
    _check_bits(bits)
    if not 2 <= n_log <= 2**bits - 1:
        raise ValueError(f"HLUQ: n_log must be in [2, {2**bits - 1}] at {bits} bits, got {n_log}")
    x_min, s1, s2 = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (x_min, s1, s2))
    _check_positive("HLUQ s1", s1)
    _check_positive("HLUQ s2", s2)
    return x_min, s1, s2


@torch.no_grad()
def quantize_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """HLUQ codes: ``[0, n_log)`` log region below the breakpoint ``s1`` (code 0 <-> 0), ``[n_log, L)``
    uniform steps of ``s2`` above it; values past the top clip to the top level."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    return _encode_hluq(x.float(), x_min, s1, s2, n_log, bits, ste=False).to(torch.int32)


def dequantize_hluq(codes: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """Decode HLUQ codes."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, codes.device)
    return _decode_hluq(codes.float(), x_min, s1, s2, n_log)


def fake_quant_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """HLUQ fake-quant; STE gradients reach ``x``, ``s1`` and ``s2``."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    return _decode_hluq(_encode_hluq(x.float(), x_min, s1, s2, n_log, bits, ste=True), x_min, s1, s2, n_log)


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_positive(what: str, t: Tensor) -> None:
    t = t.detach()
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{what} must be finite and > 0, got {t.flatten()[:4].tolist()}")


def _norm_axis(axis: int, x: Tensor) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()

