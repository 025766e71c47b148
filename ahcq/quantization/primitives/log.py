"""The table-decoded log families: adaptive-granularity log (AGQ), power-of-two (log2 = AGQ with
``tau = 1``) and log-transform nonlinear quantization (LNQ).

The log families' fake-quants are autograd Functions: the forward is the encoder followed by the decoder
(so it equals dequantize(quantize(x)) bit for bit) and the backward is the straight-through derivative of
the decoder written out, recomputed from the saved input and output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import engine
from .grid import _LOG_FLOOR, _check_bits, _check_keep, _check_positive, _floor_code, _item, _needs_grad

# ---------------------------------------------------------------------------------------------------------
# adaptive-granularity log (AGQ) and power-of-two (log2 = AGQ with tau = 1)


def _agq_encoder(scale: Tensor, tau: float, bits: int) -> engine.Encoder:
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


def _agq_key(scale: Tensor, tau: float, bits: int) -> engine.TableKey:
    return ("agq", _item(scale), tau, bits)


def _decode_agq(code: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    top = 2**bits - 1
    level = scale * torch.exp2((code - top) / tau)
    return torch.where(code == 0, torch.zeros_like(level), level)


class _FakeQuantAGQ(torch.autograd.Function):
    """With ``k`` straight-through, ``y = s*2^(-k/tau)`` has ``dy/dx = y/x`` and ``dy/ds = 0`` on the grid;
    values clipped to ``s`` (``k < 0``) have ``dy/ds = 1``; underflows to 0 have no gradient. ``keep``: QDrop
    (see ``uniform._FakeQuantUniform``). Forward: the shared encoder and table; backward: ``-k``
    recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, tau: float, bits: int, keep: Tensor | None) -> Tensor:
        levels = engine.decode_table(_decode_agq, bits, x.device, scale, tau, bits)
        x, out, ctx.row = engine.table_fake_quant(x, keep, levels, _agq_encoder(scale, tau, bits),
                                                   _agq_key(scale, tau, bits))
        ctx.tau, ctx.log2_scale = tau, _item(torch.log2(scale))
        ctx.save_for_backward(x, out, keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep = ctx.saved_tensors
        tau, log2_scale, need_s = ctx.tau, ctx.log2_scale, ctx.needs_input_grad[1]

        def fused() -> tuple[Tensor | None, list[float]]:
            grad_x, ds = engine.native_agq_backward(x, out, keep, grad, log2_scale, tau,
                                                    ctx.needs_input_grad[0])
            return grad_x, [ds]

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> engine.Derivatives:
            minus_k = torch.clamp(x_p, min=_LOG_FLOOR).log2_().sub_(log2_scale).mul_(tau).round_()
            # on the grid (k >= 0; y = 0 for code 0 and for x <= 0, where the clamp keeps the ratio finite)
            slope = torch.div(out_p, torch.clamp(x_p, min=_LOG_FLOOR))
            slope.mul_(torch.le(minus_k, 0.0, out=torch.empty_like(slope)))
            clipped = torch.gt(minus_k, 0.0, out=minus_k) if need_s else None  # k < 0 implies x > 0
            return engine.keep_derivatives(keep_p, slope, [clipped])

        grad_x, (grad_s,) = engine.backward(derivatives, grad, [x, out, keep], ctx.row, None,
                                            ctx.needs_input_grad[0], [need_s], fused)
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
    return _agq_encoder(scale, float(tau), bits)(x.float(), engine.codes_buffer(x)).to(torch.int32)


def dequantize_agq(codes: Tensor, scale: Tensor, tau: float, bits: int) -> Tensor:
    """Decode AGQ codes."""
    scale = _agq_scale(scale, tau, bits, codes.device)
    return engine.lookup(engine.decode_table(_decode_agq, bits, codes.device, scale, tau, bits), codes)


def fake_quant_agq(x: Tensor, scale: Tensor, tau: float, bits: int, keep: Tensor | None = None) -> Tensor:
    """AGQ fake-quant; STE gradients reach ``x`` and ``scale`` (only through clipped values). ``keep``:
    QDrop, as in ``uniform.fake_quant_uniform``."""
    scale = _agq_scale(scale, tau, bits, x.device)
    if keep is not None and not _needs_grad(x, scale):
        return torch.where(_check_keep(keep, x), x, fake_quant_agq(x, scale, tau, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, scale):
        levels = engine.decode_table(_decode_agq, bits, x.device, scale, tau, bits)
        return engine.fake_quant_values(_agq_encoder(scale, float(tau), bits), levels, x.float(),
                                        _agq_key(scale, float(tau), bits))
    return _FakeQuantAGQ.apply(x.float(), scale, float(tau), bits, keep)


# ---------------------------------------------------------------------------------------------------------
# log-transform nonlinear quantization (LNQ)


def _lnq_encoder(clip: Tensor, alpha: Tensor, bits: int) -> engine.Encoder:
    """The LNQ encoder (float codes ``round(ln(1+a*x)/ln(1+a*clip)*(L-1))``, ``x`` clipped to ``[0, clip]``),
    shared by ``quantize_lnq`` and the fake-quants so that they agree bit for bit: the denominator is
    computed once per call and the clip is one clamp."""
    top = 2**bits - 1
    clip_f, alpha_f, denom = _item(clip), _item(alpha), _item(torch.log1p(alpha * clip))

    def encode(x: Tensor, out: Tensor) -> Tensor:
        return torch.clamp(x, 0.0, clip_f, out=out).mul_(alpha_f).log1p_().div_(denom).mul_(top).round_()

    return encode


def _lnq_key(clip: Tensor, alpha: Tensor, bits: int) -> engine.TableKey:
    return ("lnq", _item(clip), _item(alpha), bits)


def _decode_lnq(code: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    return torch.expm1(code / top * torch.log1p(alpha * clip)) / alpha


class _FakeQuantLNQ(torch.autograd.Function):
    """With ``c = round(t*(L-1))`` straight-through, ``t = ln(1+a*x)/D``, ``D = ln(1+a*clip)`` and
    ``y = (exp(c*D/(L-1)) - 1)/a``: ``dy/dx = (1+a*y)/(1+a*x)`` for ``0 <= x <= clip``, and
    ``dy/dclip = (1+a*y)/(1+a*clip) * (c/(L-1) - t + [x > clip])``. ``keep``: QDrop (see
    ``uniform._FakeQuantUniform``). Forward: the shared encoder and table; backward: ``c`` and ``t``
    recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, alpha: Tensor, bits: int, keep: Tensor | None) -> Tensor:
        levels = engine.decode_table(_decode_lnq, bits, x.device, clip, alpha, bits)
        encode = _lnq_encoder(clip, alpha, bits)
        x, out, ctx.row = engine.table_fake_quant(x, keep, levels, encode, _lnq_key(clip, alpha, bits))
        ctx.encode, ctx.top = encode, 2**bits - 1
        ctx.save_for_backward(x, out, keep, clip, alpha)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, clip, alpha = ctx.saved_tensors
        clip_f, alpha_f, depth = _item(clip), _item(alpha), _item(torch.log1p(alpha * clip))
        growth_clip, need_clip = _item(alpha * clip + 1.0), ctx.needs_input_grad[1]

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> engine.Derivatives:
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
            return engine.keep_derivatives(keep_p, slope, [dclip])

        grad_x, (grad_clip,) = engine.backward(derivatives, grad, [x, out, keep], ctx.row, None,
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
    return _lnq_encoder(clip, alpha, bits)(x.float(), engine.codes_buffer(x)).to(torch.int32)


def dequantize_lnq(codes: Tensor, clip: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Decode LNQ codes: ``(exp(c/(L-1)*ln(1+a*clip)) - 1)/a``."""
    clip, alpha = _lnq_params(clip, alpha, bits, codes.device)
    return engine.lookup(engine.decode_table(_decode_lnq, bits, codes.device, clip, alpha, bits), codes)


def fake_quant_lnq(x: Tensor, clip: Tensor, alpha: Tensor, bits: int, keep: Tensor | None = None) -> Tensor:
    """LNQ fake-quant; STE gradients reach ``x`` (inside ``[0, clip]``) and ``clip``; ``alpha`` is fixed.
    ``keep``: QDrop, as in ``uniform.fake_quant_uniform``."""
    clip, alpha = _lnq_params(clip, alpha, bits, x.device)
    if alpha.requires_grad:
        raise ValueError("fake_quant_lnq: alpha is not learnable; pass it detached")
    if keep is not None and not _needs_grad(x, clip):
        return torch.where(_check_keep(keep, x), x, fake_quant_lnq(x, clip, alpha, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, clip):
        levels = engine.decode_table(_decode_lnq, bits, x.device, clip, alpha, bits)
        return engine.fake_quant_values(_lnq_encoder(clip, alpha, bits), levels, x.float(),
                                        _lnq_key(clip, alpha, bits))
    return _FakeQuantLNQ.apply(x.float(), clip, alpha, bits, keep)
