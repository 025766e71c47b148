"""Primitives against independent references: torch's fake-quant ops, float64 numpy re-derivations of the
formulas, exhaustive integer-code round trips and hand-derived gradients."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from ahcq.quantization import primitives as P

BITS = list(range(2, 9))
SIGNS = [False, True]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of float32 tensors (+0 and -0 differ)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _test_input(scale: torch.Tensor, qmin: int, qmax: int, n: int) -> torch.Tensor:
    """Random values around and beyond the grid plus values at exact rounding ties (x = (k + 1/2) * s)."""
    span = float((qmax - qmin) * scale.max())
    wide = (torch.rand(n) - 0.5) * 3 * span
    k = torch.randint(2 * qmin - 4, 2 * qmax + 4, (n,)).float()
    ties = (k + 0.5) * scale.max()
    return torch.cat([wide, ties, torch.zeros(3), torch.tensor([span * 10, -span * 10])])


# ---------------------------------------------------------------------------------------------------------
# grids and parameters


def test_qrange_values() -> None:
    assert P.qrange(4, False) == (0, 15)
    assert P.qrange(4, True) == (-8, 7)
    assert P.qrange(2, True) == (-2, 1)
    assert P.qrange(8, False) == (0, 255)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_qrange_rejects_bits(bits) -> None:
    with pytest.raises(ValueError, match="bits"):
        P.qrange(bits, False)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", SIGNS)
@pytest.mark.parametrize(
    "lo,hi",
    [(0.0, 0.0), (3.0, 3.0), (-2.0, -2.0), (-5.0, -0.5), (0.5, 7.0), (-1.0, 2.0), (-1e-30, 1e-30),
     (0.0, 3.4e38)],
)
def test_qparams_degenerate_ranges(bits: int, symmetric: bool, lo: float, hi: float) -> None:
    qmin, qmax = P.qrange(bits, symmetric)
    scale, zp = P.qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    assert scale.shape == zp.shape == () and zp.dtype == torch.float32
    assert math.isfinite(scale.item()) and scale.item() > 0
    assert zp.item() == round(zp.item()) and qmin <= zp.item() <= qmax
    if symmetric:
        assert zp.item() == 0
    # zero is exactly representable and the observed range (widened to 0) is covered to half a step
    zero = P.fake_quant_uniform(torch.zeros(1), scale, zp, qmin, qmax)
    assert zero.item() == 0.0
    ends = torch.tensor([min(lo, 0.0), max(hi, 0.0)])
    err = (P.fake_quant_uniform(ends, scale, zp, qmin, qmax) - ends).abs().max().item()
    assert err <= scale.item() / 2 * (1 + 1e-5) + 1e-30 or symmetric and err <= scale.item() * (1 + 1e-5)


def test_qparams_per_channel_shapes_and_reference() -> None:
    lo = torch.tensor([-1.0, 0.0, -3.0, 2.0])
    hi = torch.tensor([2.0, 0.0, -1.0, 4.0])
    scale, zp = P.qparams_from_minmax(lo, hi, 4, False)
    assert scale.shape == zp.shape == (4,)
    width = np.maximum(hi.numpy(), 0) - np.minimum(lo.numpy(), 0)
    exp_scale = np.maximum(width / 15, np.finfo(np.float32).eps)
    np.testing.assert_allclose(scale.numpy(), exp_scale, rtol=1e-6)
    np.testing.assert_array_equal(zp.numpy(), [5.0, 0.0, 15.0, 0.0])
    scale, zp = P.qparams_from_minmax(lo, hi, 4, True)
    np.testing.assert_allclose(scale.numpy(), [2 / 7.5, P.SCALE_EPS, 3 / 7.5, 4 / 7.5], rtol=1e-6)
    assert torch.all(zp == 0)


def test_qparams_of_ranges_near_float32_max() -> None:
    # the width overflows float32, the 8-bit grid does not: its levels reach both ends
    scale, zp = P.qparams_from_minmax(torch.tensor(-3e38), torch.tensor(3e38), 8, False)
    ends = torch.tensor([-3e38, 3e38])
    out = P.fake_quant_uniform(ends, scale, zp, 0, 255)
    assert torch.isfinite(out).all() and (out - ends).abs().max() <= scale / 2 * (1 + 1e-5)
    # at 3 bits zero on the grid puts a level at -4 * 6e38 / 7, beyond float32: refused, not inf
    with pytest.raises(ValueError, match="beyond float32"):
        P.qparams_from_minmax(torch.tensor(-3e38), torch.tensor(3e38), 3, False)


def test_qparams_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        P.qparams_from_minmax(torch.tensor(float("nan")), torch.tensor(1.0), 4, False)
    with pytest.raises(ValueError, match="xmin > xmax"):
        P.qparams_from_minmax(torch.tensor(2.0), torch.tensor(1.0), 4, False)
    with pytest.raises(ValueError, match="shape"):
        P.qparams_from_minmax(torch.zeros(3), torch.zeros(4), 4, False)


def test_view_along_and_errors() -> None:
    x = torch.zeros(2, 3, 5)
    p = torch.arange(3.0)
    assert P.view_along(p, x, 1).shape == (1, 3, 1)
    assert P.view_along(torch.arange(5.0), x, -1).shape == (1, 1, 5)
    assert torch.equal((x + P.view_along(p, x, 1))[1, :, 4], p)
    with pytest.raises(ValueError, match="does not match axis"):
        P.view_along(p, x, 2)
    with pytest.raises(ValueError, match="out of range"):
        P.view_along(p, x, 3)


def test_grad_scale() -> None:
    s = torch.tensor([0.123456789, 3.0], requires_grad=True)
    t = P.grad_scale(s, 0.01)
    assert _bits_equal(t.detach(), s.detach())
    t.backward(torch.tensor([1.0, 2.0]))
    assert torch.allclose(s.grad, torch.tensor([0.01, 0.02]))


def test_expand_groups_gathers_and_accumulates() -> None:
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    index = torch.tensor([2, 0, 0, 1, 2, 2])
    out = P.expand_groups(p, index)
    assert out.tolist() == [3.0, 1.0, 1.0, 2.0, 3.0, 3.0]
    out.backward(torch.arange(6.0))
    assert p.grad.tolist() == [1.0 + 2.0, 3.0, 0.0 + 4.0 + 5.0]
    with pytest.raises(ValueError, match="outside"):
        P.expand_groups(p, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        P.expand_groups(p, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------------------
# uniform: bit-exact with torch


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", SIGNS)
def test_uniform_per_tensor_matches_torch(bits: int, symmetric: bool) -> None:
    qmin, qmax = P.qrange(bits, symmetric)
    for scale_value in (0.25, 0.0371, 1.3e-3):
        scale = torch.tensor(scale_value)
        zp = torch.tensor(0.0 if symmetric else float(torch.randint(qmin, qmax + 1, ()).item()))
        x = _test_input(scale, qmin, qmax, 4000)
        ours = P.fake_quant_uniform(x, scale, zp, qmin, qmax)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.int(), qmin, qmax)
        assert _bits_equal(ours, ref)
        codes = P.quantize_uniform(x, scale, zp, qmin, qmax)
        assert codes.dtype == torch.int32 and codes.min() >= qmin and codes.max() <= qmax
        assert _bits_equal(P.dequantize_uniform(codes, scale, zp), ours)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", SIGNS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_uniform_per_channel_matches_torch(bits: int, symmetric: bool, axis: int) -> None:
    qmin, qmax = P.qrange(bits, symmetric)
    channels = 7
    scale = torch.rand(channels) * 0.2 + 1e-3
    scale[0] = 0.125
    zp = torch.zeros(channels) if symmetric else torch.randint(qmin, qmax + 1, (channels,)).float()
    base = _test_input(scale, qmin, qmax, 2000)
    x = base[: base.numel() // channels * channels].reshape(-1, channels)
    if axis == 0:
        x = x.T.contiguous()
    ours = P.fake_quant_uniform(x, scale, zp, qmin, qmax, axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis % 2, qmin, qmax)
    assert _bits_equal(ours, ref)
    codes = P.quantize_uniform(x, scale, zp, qmin, qmax, axis=axis)
    assert _bits_equal(P.dequantize_uniform(codes, scale, zp, axis=axis), ours)


@pytest.mark.filterwarnings("ignore:.*deprecated")
@pytest.mark.parametrize("symmetric", SIGNS)
def test_uniform_codes_match_torch_quantized_tensors(symmetric: bool) -> None:
    qmin, qmax = P.qrange(8, symmetric)
    dtype = torch.qint8 if symmetric else torch.quint8
    x = torch.randn(5000) * 3
    scale, zp = torch.tensor(0.0371), torch.tensor(0.0 if symmetric else 17.0)
    ref = torch.quantize_per_tensor(x, float(scale), int(zp), dtype).int_repr().int()
    assert torch.equal(P.quantize_uniform(x, scale, zp, qmin, qmax), ref)


def test_uniform_rejects_bad_parameters() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="per-tensor"):
        P.fake_quant_uniform(x, torch.ones(3), torch.zeros(3), 0, 15)
    with pytest.raises(ValueError, match="per-channel"):
        P.fake_quant_uniform(x, torch.ones(4), torch.zeros(4), 0, 15, axis=1)
    with pytest.raises(ValueError, match="not learnable"):
        P.fake_quant_uniform(x, torch.ones(()), torch.zeros((), requires_grad=True), 0, 15)
    with pytest.raises(ValueError, match="qmin"):
        P.fake_quant_uniform(x, torch.ones(()), torch.zeros(()), 15, 0)


# ---------------------------------------------------------------------------------------------------------
# uniform: gradients equal torch's learnable fake-quant ops (LSQ)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", SIGNS)
def test_uniform_per_tensor_gradients_match_torch_learnable(bits: int, symmetric: bool) -> None:
    qmin, qmax = P.qrange(bits, symmetric)
    x = torch.randn(64, 33) * 2
    zp = torch.tensor(0.0 if symmetric else float(qmax // 3))
    upstream = torch.randn_like(x)
    factor = 1.0 / math.sqrt(x.numel() * qmax)

    x1, s1 = x.clone().requires_grad_(), torch.tensor(3.0 / qmax, requires_grad=True)
    y1 = P.fake_quant_uniform(x1, P.grad_scale(s1, factor), zp, qmin, qmax)
    y1.backward(upstream)

    x2, s2 = x.clone().requires_grad_(), torch.tensor([3.0 / qmax], requires_grad=True)
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, zp.reshape(1), qmin, qmax, factor)
    y2.backward(upstream)

    assert _bits_equal(y1.detach(), y2.detach())
    assert torch.equal(x1.grad, x2.grad)
    assert (x1.grad == 0).any() and (x1.grad == upstream).any()  # both clipped and in-range elements
    torch.testing.assert_close(s1.grad.reshape(1), s2.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", SIGNS)
def test_uniform_per_channel_gradients_match_torch_learnable(bits: int, symmetric: bool) -> None:
    qmin, qmax = P.qrange(bits, symmetric)
    x = torch.randn(48, 6) * torch.tensor([0.5, 1.0, 2.0, 4.0, 0.1, 3.0])
    scale = torch.tensor([0.6, 1.0, 1.5, 2.0, 0.2, 4.0]) / qmax
    zp = torch.zeros(6) if symmetric else torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, float(qmax)])
    upstream = torch.randn_like(x)
    factor = 1.0 / math.sqrt(x.numel() / 6 * qmax)

    x1, s1 = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y1 = P.fake_quant_uniform(x1, P.grad_scale(s1, factor), zp, qmin, qmax, axis=1)
    y1.backward(upstream)

    x2, s2 = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y2 = torch._fake_quantize_learnable_per_channel_affine(x2, s2, zp, 1, qmin, qmax, factor)
    y2.backward(upstream)

    assert _bits_equal(y1.detach(), y2.detach())
    assert torch.equal(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_uniform_scale_gradient_hand_computed() -> None:
    # s = 1, z = 0, grid 0..3: x = 0.3 -> round 0, d/ds = 0 - 0.3; x = 1.6 -> 2 - 1.6;
    # x = 7 -> clipped high, qmax - z = 3; x = -2 -> clipped low, qmin - z = 0
    x = torch.tensor([0.3, 1.6, 7.0, -2.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    P.fake_quant_uniform(x, s, torch.tensor(0.0), 0, 3).sum().backward()
    assert s.grad.item() == pytest.approx(-0.3 + 0.4 + 3.0 + 0.0, abs=1e-6)
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# log families: float64 numpy re-derivations (written independently from the contract's formulas)


def _np_agq(x: np.ndarray, scale: float, tau: float, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, values and the pre-rounding exponent of AGQ in float64."""
    levels = 2**bits
    with np.errstate(divide="ignore"):
        e = -tau * np.log2(np.where(x > 0, x, 0.0) / scale)
    k = np.rint(e)
    code = np.where(k >= levels - 1, 0, levels - 1 - np.maximum(k, 0)).astype(np.int64)
    value = np.where(code == 0, 0.0, scale * 2.0 ** ((code - (levels - 1)) / tau))
    return code, value, e


def _np_lnq(x: np.ndarray, clip: float, alpha: float, bits: int):
    top = 2**bits - 1
    xc = np.clip(x, 0.0, clip)
    t = np.log(1.0 + alpha * xc) / np.log(1.0 + alpha * clip) * top
    code = np.rint(t).astype(np.int64)
    value = (np.exp(code / top * np.log(1.0 + alpha * clip)) - 1.0) / alpha
    return code, value, t


def _np_hluq(x: np.ndarray, x_min: float, s1: float, s2: float, n_log: int, bits: int):
    levels = 2**bits
    u = x - x_min
    uniform = u > s1 + s2 / 2
    v = (u - s1) / s2
    j = np.clip(np.rint(v), 1, levels - n_log)
    with np.errstate(divide="ignore"):
        e = -np.log2(np.where(u > 0, u, 0.0) / s1)
    k = np.maximum(np.rint(e), 0)
    log_code = np.where(k >= n_log - 1, 0, n_log - 1 - k)
    code = np.where(uniform, n_log - 1 + j, log_code).astype(np.int64)
    log_value = np.where(code == 0, 0.0, s1 * 2.0 ** (code - (n_log - 1.0)))
    u_hat = np.where(code >= n_log, s1 + (code - n_log + 1) * s2, log_value)
    pre = np.where(uniform, v, e)
    boundary = np.abs(u - (s1 + s2 / 2)) / s2  # distance to the region switch, in uniform steps
    return code, u_hat + x_min, pre, boundary


def _near_tie(pre: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    finite = np.isfinite(pre)
    frac = np.abs(np.abs(np.where(finite, pre, 0.0)) % 1.0 - 0.5)
    return finite & (frac < tol)


def _check_against_reference(codes, values, ref_code, ref_value, ambiguous, atol: float = 1e-30) -> None:
    codes, values = codes.numpy(), values.numpy().astype(np.float64)
    mismatch = codes != ref_code
    assert not np.any(mismatch & ~ambiguous), "codes differ away from rounding ties"
    assert mismatch.mean() < 1e-3
    ok = ~mismatch
    np.testing.assert_allclose(values[ok], ref_value[ok], rtol=2e-6, atol=atol)


def _positive_samples(scale: float, n: int) -> torch.Tensor:
    logs = torch.rand(n) * 40 - 36  # 2^-36 .. 2^4 relative to the scale
    return torch.cat([scale * torch.exp2(logs), torch.tensor([0.0, -1.0, scale, 8 * scale])])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_agq_matches_float64_reference(bits: int, tau: float) -> None:
    scale = 0.37
    x = _positive_samples(scale, 5000)
    codes = P.quantize_agq(x, torch.tensor(scale), tau, bits)
    values = P.fake_quant_agq(x, torch.tensor(scale), tau, bits)
    ref_code, ref_value, e = _np_agq(x.double().numpy(), scale, tau, bits)
    _check_against_reference(codes, values, ref_code, ref_value, _near_tie(e))


def test_agq_with_tau_one_is_power_of_two() -> None:
    scale = torch.tensor(0.5)
    # hand-computed: 4 bits, levels 0.5 * 2^-k, k = 0..14
    probe = torch.tensor([0.5, 0.25, 0.3, 0.9, 0.5 * 2**-14, 0.5 * 2**-15, 0.0])
    assert P.quantize_agq(probe, scale, 1.0, 4).tolist() == [15, 14, 14, 15, 1, 0, 0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", [0.001, 1.0, 50.0])
def test_lnq_matches_float64_reference(bits: int, alpha: float) -> None:
    clip = 0.8
    x = torch.cat([torch.rand(4000), torch.tensor([0.0, -0.2, 0.8, 1.5])])
    codes = P.quantize_lnq(x, torch.tensor(clip), torch.tensor(alpha), bits)
    values = P.fake_quant_lnq(x, torch.tensor(clip), torch.tensor(alpha), bits)
    assert codes.min() == 0 and codes.max() == 2**bits - 1  # exactly L codes
    ref_code, ref_value, t = _np_lnq(x.double().numpy(), clip, alpha, bits)
    _check_against_reference(codes, values, ref_code, ref_value, _near_tie(t))


HLUQ_CASES = [
    (4, 8, 0.05, 0.02), (4, 4, 0.2, 0.05), (2, 2, 0.1, 0.3), (6, 32, 0.1, 0.01), (8, 16, 0.2, 0.004)
]


@pytest.mark.parametrize("bits,n_log,s1,s2", HLUQ_CASES)
def test_hluq_matches_float64_reference(bits: int, n_log: int, s1: float, s2: float) -> None:
    x_min = -0.17
    top = s1 + (2**bits - n_log) * s2
    x = torch.cat([x_min + torch.rand(4000) * 1.3 * top, x_min + s1 * torch.exp2(-torch.rand(1000) * n_log),
                   torch.tensor([x_min, x_min - 1.0, x_min + s1, x_min + 100.0])])
    args = (torch.tensor(x_min), torch.tensor(s1), torch.tensor(s2), n_log, bits)
    codes = P.quantize_hluq(x, *args)
    values = P.fake_quant_hluq(x, *args)
    ref_code, ref_value, pre, boundary = _np_hluq(x.double().numpy(), x_min, s1, s2, n_log, bits)
    # values are float32 sums x_min + u: compare to float32 resolution around x_min
    ambiguous = _near_tie(pre) | (boundary < 1e-4)
    _check_against_reference(codes, values, ref_code, ref_value, ambiguous, atol=3e-8)
    # values past the top clip to the top level (no collapse to the breakpoint)
    assert codes[-1].item() == 2**bits - 1
    assert values[-1].item() == pytest.approx(x_min + top, rel=1e-6)


def test_hluq_code_layout_hand_computed() -> None:
    # 3 bits, n_log = 4: codes 0..3 -> u = 0, s1/4, s1/2, s1; codes 4..7 -> s1 + j*s2, j = 1..4
    s1, s2, x_min = 1.0, 0.5, -1.0
    levels = P.dequantize_hluq(torch.arange(8), torch.tensor(x_min), torch.tensor(s1), torch.tensor(s2), 4, 3)
    assert levels.tolist() == [-1.0, -0.75, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]


def test_hluq_rejects_bad_parameters() -> None:
    x = torch.rand(5)
    with pytest.raises(ValueError, match="n_log"):
        P.fake_quant_hluq(x, torch.tensor(0.0), torch.tensor(0.1), torch.tensor(0.1), 16, 4)
    with pytest.raises(ValueError, match="s2"):
        P.fake_quant_hluq(x, torch.tensor(0.0), torch.tensor(0.1), torch.tensor(-0.1), 8, 4)
    with pytest.raises(ValueError, match="tau"):
        P.fake_quant_agq(x, torch.tensor(1.0), 0.0, 4)
    with pytest.raises(ValueError, match="alpha"):
        P.fake_quant_lnq(x, torch.tensor(1.0), torch.tensor(0.0), 4)
    with pytest.raises(ValueError, match="alpha is not learnable"):
        P.fake_quant_lnq(x, torch.tensor(1.0), torch.tensor(2.0, requires_grad=True), 4)
    with pytest.raises(ValueError, match="single value"):
        P.fake_quant_hluq(x, torch.tensor(0.0), torch.full((5,), 0.1), torch.tensor(0.1), 8, 4)
    with pytest.raises(ValueError, match="x_min"):
        P.fake_quant_hluq(x, torch.tensor(float("nan")), torch.tensor(0.1), torch.tensor(0.1), 8, 4)


# ---------------------------------------------------------------------------------------------------------
# exhaustive integer round trips: decode every code, encode it back, and fake-quant equals encode/decode


def _codec(name: str, *args) -> tuple:
    """(decode, encode, fake) of one family with its parameters bound."""
    quantize, dequantize = getattr(P, f"quantize_{name}"), getattr(P, f"dequantize_{name}")
    fake = getattr(P, f"fake_quant_{name}")
    if name == "uniform":  # args: scale, zero point, qmin, qmax; the decoder takes no grid bounds
        return (partial(dequantize, scale=args[0], zero_point=args[1]),
                partial(quantize, scale=args[0], zero_point=args[1], qmin=args[2], qmax=args[3]),
                partial(fake, scale=args[0], zero_point=args[1], qmin=args[2], qmax=args[3]))
    return (lambda c: dequantize(c, *args), lambda x: quantize(x, *args), lambda x: fake(x, *args))


def _family_cases():
    t = torch.tensor
    for bits in BITS:
        levels = 2**bits
        qmin, qmax = P.qrange(bits, False)
        yield f"uniform-asym-{bits}", bits, _codec("uniform", t(0.07), t(levels / 2 - 1), qmin, qmax), qmin
        smin, smax = P.qrange(bits, True)
        yield f"uniform-sym-{bits}", bits, _codec("uniform", t(0.013), t(0.0), smin, smax), smin
        for tau in (1.0, 2.0, 4.0):
            yield f"agq-tau{tau:g}-{bits}", bits, _codec("agq", t(1.0), tau, bits), 0
        yield f"lnq-{bits}", bits, _codec("lnq", t(0.9), t(20.0), bits), 0
        # HLUQ with n_log = L/2 (the MSB selects the lane), capped so every log level stays above float32's
        # resolution next to x_min (a log region of more than ~20 levels collapses onto x_min in float32)
        n_log = min(levels // 2, 16)
        yield f"hluq-{bits}", bits, _codec("hluq", t(-0.17), t(0.25), t(0.5 / levels), n_log, bits), 0


CASES = list(_family_cases())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exhaustive_code_round_trip(case) -> None:
    _, bits, (decode, encode, fake), first = case
    codes = torch.arange(first, first + 2**bits, dtype=torch.int32)
    values = decode(codes)
    representable = values.abs() >= torch.finfo(torch.float32).tiny
    representable[codes == codes[torch.argmin(values.abs())]] = True  # the code of zero itself
    assert torch.equal(encode(values)[representable], codes[representable])
    assert _bits_equal(fake(values)[representable], values[representable])
    # only codes of very fine log bases fall below float32's normal range (log2 at 7-8 bits, tau 2 at 8)
    assert int(representable.sum()) >= 2**bits // 2
    if bits <= 6:
        assert bool(representable.all())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fake_quant_equals_decode_of_encode(case) -> None:
    _, bits, (decode, encode, fake), _ = case
    specials = torch.tensor([0.0, -0.0, 1e9, -1e9])
    x = torch.cat([torch.randn(3000) * 2, torch.rand(3000), torch.rand(1000) * 1e-6, specials])
    assert _bits_equal(decode(encode(x)), fake(x))


# ---------------------------------------------------------------------------------------------------------
# gradients of the log families (hand-derived with straight-through rounding)


def test_agq_gradients() -> None:
    scale = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.3, 0.01, 0.9, 1e-9], requires_grad=True)  # in range, in range, clipped, underflow
    y = P.fake_quant_agq(x, scale, 2.0, 4)
    y.sum().backward()
    # in range: d(s*2^(-k/tau))/dx = y/x with k straight-through; clipped: 0; underflow: 0
    expected = torch.tensor([y[0].item() / 0.3, y[1].item() / 0.01, 0.0, 0.0])
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=0.0)
    assert scale.grad.item() == pytest.approx(1.0, abs=1e-5)  # only the clipped element moves the scale


def test_lnq_gradients() -> None:
    # with c = round_ste(t*(L-1)), t = ln(1+a*x)/D, D = ln(1+a*clip), y = (exp(c*D/(L-1)) - 1)/a:
    # dy/dx = (1+a*y)/(1+a*x) inside; dy/dclip = (1+a*y)*(c/(L-1) - t)/(1+a*clip) inside, 1 when clipped
    alpha, top, clip_value = 10.0, 15, 0.8
    clip = torch.tensor(clip_value, requires_grad=True)
    x = torch.tensor([0.1, 0.5, 1.2, -0.1], requires_grad=True)
    y = P.fake_quant_lnq(x, clip, torch.tensor(alpha), 4)
    y.sum().backward()
    xs, ys = x.detach().double()[:2], y.detach().double()[:2]
    t = torch.log1p(alpha * xs) / math.log1p(alpha * clip_value)
    c = torch.round(t * top)
    torch.testing.assert_close(x.grad[:2].double(), (1 + alpha * ys) / (1 + alpha * xs), rtol=1e-4, atol=0.0)
    assert x.grad[2:].tolist() == [0.0, 0.0]
    expected_clip = ((1 + alpha * ys) * (c / top - t) / (1 + alpha * clip_value)).sum() + 1.0
    assert clip.grad.item() == pytest.approx(expected_clip.item(), rel=1e-4, abs=1e-5)


def test_hluq_gradients_reach_s1_and_s2() -> None:
    x_min = torch.tensor(-0.2, requires_grad=True)
    s1, s2 = torch.tensor(0.1, requires_grad=True), torch.tensor(0.05, requires_grad=True)
    n_log, bits = 8, 4
    x = torch.cat([x_min.detach() + torch.rand(200) * 0.5, torch.tensor([5.0, 6.0])]).requires_grad_()
    y = P.fake_quant_hluq(x, x_min, s1, s2, n_log, bits)
    y.sum().backward()
    assert x_min.grad.item() == pytest.approx(x.numel() - x.grad.sum().item(), rel=1e-5)  # y = u_hat + x_min
    x_min = x_min.detach()
    u = (x - x_min).detach()
    uniform = u > s1.detach() + s2.detach() / 2
    top_j = 2**bits - n_log
    v = (u - s1.detach()) / s2.detach()
    clipped = uniform & (torch.round(v) > top_j)
    inside = uniform & ~clipped
    expected_s2 = (torch.round(v) - v)[inside].sum() + top_j * clipped.sum()
    assert s2.grad.item() == pytest.approx(expected_s2.item(), rel=1e-4, abs=1e-4)
    assert s1.grad.item() == pytest.approx(float(clipped.sum()), abs=1e-3)  # in-range elements cancel
    assert torch.equal(x.grad[clipped], torch.zeros(int(clipped.sum())))
    torch.testing.assert_close(x.grad[inside], torch.ones(int(inside.sum())))
    log_nonzero = ~uniform & (y.detach() > x_min)
    expected = ((y.detach() - x_min) / u)[log_nonzero]  # d(s1*2^-k)/du = u_hat/u with k straight-through
    torch.testing.assert_close(x.grad[log_nonzero], expected, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------------------
# HLUQ's purpose: better than uniform on post-GELU activations at 4 bits


def test_hluq_beats_uniform_on_gelu_at_4_bits() -> None:
    bits, levels = 4, 16
    x = torch.nn.functional.gelu(torch.randn(200_000))
    lo, hi = x.min(), x.max()
    scale, zp = P.qparams_from_minmax(lo, hi, bits, False)
    mse_uniform = (P.fake_quant_uniform(x, scale, zp, 0, levels - 1) - x).square().mean().item()
    # the best clipped uniform grid (a 1-D sweep of the upper end) is the stronger baseline
    best_clipped = min(
        (P.fake_quant_uniform(x, *P.qparams_from_minmax(lo, hi * f, bits, False), 0, levels - 1) - x)
        .square().mean().item()
        for f in np.linspace(0.05, 1.0, 96)
    )
    mse_hluq = math.inf
    for top in (0.6, 1.0):  # fraction of the range the grid reaches
        span = top * (hi - lo).item()
        for r in (0.05, 0.1, 0.2):  # breakpoint s1 as a fraction of the span
            for n_log in (2, 4, 8):
                s1 = r * span
                s2 = (1 - r) * span / (levels - n_log)
                y = P.fake_quant_hluq(x, lo, torch.tensor(s1), torch.tensor(s2), n_log, bits)
                mse_hluq = min(mse_hluq, (y - x).square().mean().item())
    assert mse_hluq < mse_uniform
    assert mse_hluq < best_clipped
