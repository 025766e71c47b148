"""Hybrid log-uniform quantization (HLUQ): a log region below the breakpoint ``s1`` and uniform steps of
``s2`` above it; encoder, decoder, fake-quant and its autograd Function."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import engine
from .grid import _LOG_FLOOR, _check_bits, _check_keep, _check_positive, _floor_code, _item, _needs_grad


def _hluq_encoder(x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> engine.Encoder:
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


def _hluq_key(x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> engine.TableKey:
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
    ``uniform._FakeQuantUniform``). Forward: the shared encoder and table; backward: the region, ``v``,
    ``round(v)`` and ``-k`` recomputed with the encoder's scalars, the masks as float 0/1 products."""

    @staticmethod
    def forward(ctx, x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int,
                keep: Tensor | None) -> Tensor:
        levels = engine.decode_table(_decode_hluq, bits, x.device, x_min, s1, s2, n_log)
        encode = _hluq_encoder(x_min, s1, s2, n_log, bits)
        key = _hluq_key(x_min, s1, s2, n_log, bits)
        x, out, ctx.row = engine.table_fake_quant(x, keep, levels, encode, key)
        ctx.steps = 2**bits - n_log
        ctx.save_for_backward(x, out, keep, x_min, s1, s2)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, keep, x_min, s1, s2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        x_min_f, s1_f, s2_f, steps = _item(x_min), _item(s1), _item(s2), ctx.steps
        log2_s1, switch = _item(torch.log2(s1)), _item(s1 + s2 / 2)

        def fused() -> tuple[Tensor | None, list[float]]:
            grad_x, ds1, ds2, dx_min = engine.native_hluq_backward(x, out, keep, grad, x_min_f, s1_f, s2_f,
                                                                   switch, steps, log2_s1, need[0])
            return grad_x, [ds1, ds2, dx_min]

        def derivatives(x_p: Tensor, out_p: Tensor, keep_p: Tensor | None) -> engine.Derivatives:
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
            slope, (ds1, ds2) = engine.keep_derivatives(keep_p, slope, [ds1, ds2])
            return slope, [ds1, ds2, torch.sub(1.0, slope) if need[1] else None]

        grad_x, (grad_s1, grad_s2, grad_x_min) = engine.backward(
            derivatives, grad, [x, out, keep], ctx.row, None, need[0], [need[2], need[3], need[1]], fused)
        if grad_x_min is not None:
            grad_x_min = grad_x_min.reshape(x_min.shape)
        return grad_x, grad_x_min, grad_s1, grad_s2, None, None, None


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
    return _hluq_encoder(x_min, s1, s2, n_log, bits)(x.float(), engine.codes_buffer(x)).to(torch.int32)


def dequantize_hluq(codes: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int) -> Tensor:
    """Decode HLUQ codes."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, codes.device)
    return engine.lookup(engine.decode_table(_decode_hluq, bits, codes.device, x_min, s1, s2, n_log), codes)


def fake_quant_hluq(x: Tensor, x_min: Tensor, s1: Tensor, s2: Tensor, n_log: int, bits: int,
                    keep: Tensor | None = None) -> Tensor:
    """HLUQ fake-quant; STE gradients reach ``x``, ``x_min``, ``s1`` and ``s2``. ``keep``: QDrop, as in
    ``fake_quant_uniform``."""
    x_min, s1, s2 = _hluq_params(x_min, s1, s2, n_log, bits, x.device)
    if keep is not None and not _needs_grad(x, x_min, s1, s2):
        return torch.where(_check_keep(keep, x), x, fake_quant_hluq(x, x_min, s1, s2, n_log, bits))
    keep = _check_keep(keep, x)
    if not _needs_grad(x, x_min, s1, s2):
        levels = engine.decode_table(_decode_hluq, bits, x.device, x_min, s1, s2, n_log)
        return engine.fake_quant_values(_hluq_encoder(x_min, s1, s2, n_log, bits), levels, x.float(),
                                        _hluq_key(x_min, s1, s2, n_log, bits))
    return _FakeQuantHLUQ.apply(x.float(), x_min, s1, s2, n_log, bits, keep)
