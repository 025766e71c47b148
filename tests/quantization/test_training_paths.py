"""Training (autograd) paths of the fake-quants: sliced CPU forwards/backwards, QDrop's fused ``keep``, the
fused AdaRound soft rounding and regulariser, the QDrop mask. Each is checked against an independent
reference: torch's learnable fake-quant ops, or the plain-torch formula in float64 differentiated by
autograd with straight-through rounding, with the codes pinned to the primitives' (already tested) codes."""
import math

import pytest
import torch

from ahcq.quantization import primitives as P
from ahcq.quantization.primitives import engine
from ahcq.quantization.quantizers import AdaRoundQuantizer, LSQQuantizer, Mode, Role
from ahcq.quantization.quantizers.adaround import GAMMA, ZETA
from ahcq.quantization.quantizers.base import keep_mask

# odd sizes that cross several slices (engine.SLICE elements per intra-op thread) and end in a partial one
N = 3 * engine.SLICE * torch.get_num_threads() + 123


def _ste(t: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in value, the gradient of ``t``."""
    return t + (rounded - t).detach()


def _clamp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp`` whose gradient passes on the closed interval (the families' documented derivatives;
    ``torch.clamp``'s is zero at the bounds)."""
    return torch.where((t >= lo) & (t <= hi), t, t.clamp(lo, hi).detach())


def _keep(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.3


def _grads(fn, x: torch.Tensor, params: list[torch.Tensor], upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    y.backward(upstream)
    return y.detach(), x.grad, [p.grad for p in params]


# ---------------------------------------------------------------------------------------------------------
# uniform: torch's learnable fake-quant ops are the reference


@pytest.mark.parametrize("use_keep", [False, True])
def test_uniform_per_tensor_sliced_matches_torch_learnable(use_keep: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g) * 2
    upstream = torch.randn(N, generator=g)
    keep = _keep(x.shape) if use_keep else None
    zp, qmin, qmax = torch.tensor(7), 0, 15

    def ours(x, s):
        return P.fake_quant_uniform(x, s, zp, qmin, qmax, keep=keep)

    def ref(x, s):
        y = torch._fake_quantize_learnable_per_tensor_affine(x, s, zp.float().reshape(1), qmin, qmax, 1.0)
        return torch.where(keep, x, y) if keep is not None else y

    scale = torch.tensor(0.31)
    y1, gx1, (gs1,) = _grads(ours, x, [scale], upstream)
    y2, gx2, (gs2,) = _grads(ref, x, [scale.reshape(1)], upstream)
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(gs1.reshape(1), gs2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("axis", [-1, 0])  # sliced rows (last axis) and one piece (another axis)
def test_uniform_per_channel_matches_torch_learnable(use_keep: bool, axis: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 9101, 24, generator=g) * torch.linspace(0.5, 3, 24)
    if axis == 0:
        x = x.reshape(24, -1, 7)
    upstream = torch.randn(x.shape, generator=g)
    channels = x.shape[axis]
    keep = _keep(x.shape) if use_keep else None
    scale = torch.linspace(0.1, 0.5, channels)
    zp = torch.arange(channels, dtype=torch.int32) % 16

    def ours(x, s):
        return P.fake_quant_uniform(x, s, zp, 0, 15, axis=axis, keep=keep)

    def ref(x, s):
        y = torch._fake_quantize_learnable_per_channel_affine(x, s, zp.float(), axis % x.dim(), 0, 15, 1.0)
        return torch.where(keep, x, y) if keep is not None else y

    y1, gx1, (gs1,) = _grads(ours, x, [scale], upstream)
    y2, gx2, (gs2,) = _grads(ref, x, [scale], upstream)
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(gs1, gs2, rtol=1e-4, atol=1e-3)


def test_uniform_non_contiguous_input_and_upstream() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(24, 3000, generator=g)
    scale, zp = torch.tensor(0.2), torch.tensor(3)
    y1, gx1, (gs1,) = _grads(lambda x, s: P.fake_quant_uniform(x.t(), s, zp, 0, 15), base, [scale],
                             torch.ones(3000, 24))
    y2, gx2, (gs2,) = _grads(lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(
        x.t(), s, zp.float().reshape(1), 0, 15, 1.0), base, [scale.reshape(1)], torch.ones(3000, 24))
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    torch.testing.assert_close(gs1.reshape(1), gs2, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# log families: float64 formulas through autograd, straight-through rounding


def _agq_ref(x: torch.Tensor, s: torch.Tensor, tau: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = 2**bits - 1
    k_cont = -tau * torch.log2(x.clamp_min(1e-300) / s)
    code = _clamp(top - _ste(k_cont, torch.round(k_cont)), 0, top)
    zero = (code.detach() == 0) | (x.detach() <= 0)
    y = torch.where(zero, torch.zeros_like(x), s * torch.exp2((code - top) / tau))
    return y, code.detach()


def _lnq_ref(x: torch.Tensor, clip: torch.Tensor, alpha: float, bits: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    top = 2**bits - 1
    depth = torch.log1p(alpha * clip)
    t = torch.log1p(alpha * torch.minimum(x, clip).clamp_min(0.0)) / depth * top
    code = _ste(t, torch.round(t))
    return torch.expm1(code / top * depth) / alpha, code.detach()


def _hluq_ref(x: torch.Tensor, x_min: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, n_log: int, bits: int,
              uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = n_log - 1
    u = x - x_min
    v = (u - s1) / s2
    j = _clamp(_ste(v, torch.round(v)), 1, 2**bits - n_log)
    k_cont = torch.log2(s1) - torch.log2(u.clamp_min(1e-300))
    code_log = _clamp(top - _ste(k_cont, torch.round(k_cont)), 0, top)
    level_log = torch.where((code_log.detach() == 0) | (u.detach() <= 0), torch.zeros_like(u),
                            s1 * torch.exp2(code_log - top))
    y = torch.where(uniform, s1 + j * s2, level_log) + x_min
    return y, torch.where(uniform, j.detach() + top, code_log.detach())


def _check_log_family(ours, ref, codes32, x, params, keep, upstream) -> None:
    """Values, x gradients and parameter gradients where the float64 reference's codes agree with the
    primitive's (the upstream gradient is zero elsewhere, so the parameter sums compare too)."""
    xd = x.double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params]
    yd, code_d = ref(xd, *pd)
    if keep is not None:
        yd = torch.where(keep, xd, yd)
    agree = code_d == codes32.double()
    if keep is not None:
        agree |= keep
    assert agree.float().mean() > 0.999
    upstream = upstream * agree
    (yd * upstream.double()).sum().backward()
    y, gx, gp = _grads(lambda x, *p: ours(x, *p, keep=keep), x, params, upstream)
    torch.testing.assert_close(y.double()[agree], yd.detach()[agree], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx.double()[agree], xd.grad[agree], rtol=1e-4, atol=1e-6)
    for p, ours_grad, ref_p in zip(params, gp, pd):
        if p.requires_grad:
            torch.testing.assert_close(ours_grad.double(), ref_p.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_agq_sliced_gradients_match_float64(use_keep: bool, tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.softmax(torch.randn(N // 64, 64, generator=g) * 3, dim=-1).reshape(-1)
    x[:7] = 0.0
    scale = torch.tensor(0.3).requires_grad_()
    keep = _keep(x.shape) if use_keep else None
    codes = P.quantize_agq(x, scale.detach(), tau, 4)
    _check_log_family(lambda x, s, keep: P.fake_quant_agq(x, s, tau, 4, keep=keep),
                      lambda x, s: _agq_ref(x, s, tau, 4), codes, x, [scale], keep,
                      torch.randn(x.shape, generator=g))


@pytest.mark.parametrize("use_keep", [False, True])
def test_lnq_sliced_gradients_match_float64(use_keep: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(N, generator=g) ** 3 * 1.2 - 0.05
    clip, alpha = torch.tensor(0.8).requires_grad_(), torch.tensor(20.0)
    keep = _keep(x.shape) if use_keep else None
    codes = P.quantize_lnq(x, clip.detach(), alpha, 4)
    _check_log_family(lambda x, c, keep: P.fake_quant_lnq(x, c, alpha, 4, keep=keep),
                      lambda x, c: _lnq_ref(x, c, 20.0, 4), codes, x, [clip], keep,
                      torch.randn(x.shape, generator=g))


@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("n_log", [4, 8])
def test_hluq_sliced_gradients_match_float64(use_keep: bool, n_log: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(N, generator=g) * 2)
    x_min, s1, s2 = torch.tensor(-0.17), torch.tensor(0.3), torch.tensor(0.4)
    params = [x_min, s1.requires_grad_(), s2.requires_grad_()]
    keep = _keep(x.shape) if use_keep else None
    codes = P.quantize_hluq(x, x_min, s1.detach(), s2.detach(), n_log, 4)
    uniform = codes >= n_log
    _check_log_family(lambda x, m, a, b, keep: P.fake_quant_hluq(x, m, a, b, n_log, 4, keep=keep),
                      lambda x, m, a, b: _hluq_ref(x, m, a, b, n_log, 4, uniform), codes, x, params, keep,
                      torch.randn(x.shape, generator=g))


def test_keep_is_validated() -> None:
    x = torch.randn(10, requires_grad=True)
    with pytest.raises(ValueError, match="keep"):
        P.fake_quant_uniform(x, torch.tensor(0.1), torch.tensor(0), 0, 15, keep=torch.ones(10))
    with pytest.raises(ValueError, match="keep"):
        P.fake_quant_agq(x.abs(), torch.tensor(0.5), 1.0, 4, keep=torch.ones(9, dtype=torch.bool))


def test_keep_without_autograd_equals_where() -> None:
    x = torch.randn(N)
    keep = _keep(x.shape)
    with torch.no_grad():
        got = P.fake_quant_uniform(x, torch.tensor(0.2), torch.tensor(8), 0, 15, keep=keep)
    quantized = P.fake_quant_uniform(x, torch.tensor(0.2), torch.tensor(8), 0, 15)
    assert torch.equal(got, torch.where(keep, x, quantized))


# ---------------------------------------------------------------------------------------------------------
# QDrop mask and quantizers in DROP mode


def test_keep_mask_is_seeded_with_probability_p() -> None:
    a = keep_mask((300, 701), 0.3, torch.Generator().manual_seed(9))
    b = keep_mask((300, 701), 0.3, torch.Generator().manual_seed(9))
    c = keep_mask((300, 701), 0.3, torch.Generator().manual_seed(10))
    assert a.dtype == torch.bool and a.shape == (300, 701)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.3) < 0.005
    assert not keep_mask((5, 3), 0.0, None).any() and keep_mask((5, 3), 1.0, None).all()
    assert keep_mask((0, 3), 0.5, torch.Generator()).shape == (0, 3)


def test_drop_mode_equals_where_of_the_quantized_tensor() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 5000, generator=g)
    q = LSQQuantizer(Role.INPUT, 4, observer="minmax")
    q.set_mode(Mode.CALIBRATE)
    q(x)
    q.set_mode(Mode.DROP, drop_p=0.5, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    y = q(xr)
    y.backward(torch.ones_like(y))
    keep = keep_mask(x.shape, 0.5, torch.Generator().manual_seed(1))
    q.set_mode(Mode.QUANTIZE)
    q.scale.grad, xr2 = None, x.clone().requires_grad_()
    y2 = torch.where(keep, xr2, q(xr2))
    y2.backward(torch.ones_like(y2))
    assert torch.equal(y.detach(), y2.detach()) and torch.equal(xr.grad, xr2.grad)


# ---------------------------------------------------------------------------------------------------------
# AdaRound: the fused soft rounding and the regulariser against the plain formulas


def _adaround(w: torch.Tensor, ch_axis: int | None = 0) -> AdaRoundQuantizer:
    q = AdaRoundQuantizer(Role.WEIGHT, 4, observer="minmax", ch_axis=ch_axis, name="w")
    q.set_mode(Mode.CALIBRATE)
    q(w)
    q.set_mode(Mode.QUANTIZE)
    with torch.no_grad():
        q.alpha.add_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(8)) * 4)
        q.alpha.view(-1)[:4] = torch.tensor([60.0, -60.0, 0.0, math.log(3.0)])  # clamped, clamped, 0.5, 0.8
    return q


def _plain_soft(q: AdaRoundQuantizer, w: torch.Tensor, alpha: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    scale = q.scale.to(dtype) if q.ch_axis is None else P.view_along(q.scale.to(dtype), w, q.ch_axis)
    zp = q.zero_point.to(dtype) if q.ch_axis is None else P.view_along(q.zero_point.to(dtype), w, q.ch_axis)
    h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    codes = torch.clamp(torch.floor(w.to(dtype) / scale) + h + zp, q.qmin, q.qmax)
    return scale * (codes - zp)


@pytest.mark.parametrize("ch_axis", [0, None, 1])
def test_soft_rounding_matches_the_plain_formula(ch_axis: int | None) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 1500, generator=g) * torch.linspace(0.1, 2.0, 1500)
    q = _adaround(w, ch_axis)
    upstream = torch.randn(w.shape, generator=g)
    y = q(w)
    (y * upstream).sum().backward()
    # the same float32 ops in the same order; a sigmoid may differ in the last bit between torch's vector
    # loop and its scalar tail, which fall on other elements in slices
    torch.testing.assert_close(y.detach(), _plain_soft(q, w, q.alpha.detach(), torch.float32), rtol=0,
                               atol=float(q.scale.max()) * 2**-18)
    alpha64 = q.alpha.detach().double().requires_grad_()
    (_plain_soft(q, w, alpha64, torch.float64) * upstream.double()).sum().backward()
    torch.testing.assert_close(q.alpha.grad.double(), alpha64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b", [2.0, 3.0, 7.3, 20.0])
def test_regulariser_matches_the_plain_formula(b: float) -> None:
    w = torch.randn(64, 2100, generator=torch.Generator().manual_seed(9))
    q = _adaround(w)
    alpha64 = q.alpha.detach().double().requires_grad_()
    h = torch.clamp(torch.sigmoid(alpha64) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    ref = (1.0 - (2.0 * h - 1.0).abs().pow(b)).sum()
    ref.backward()
    value = q.regularizer(b)
    value.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(q.alpha.grad.double(), alpha64.grad, rtol=1e-5, atol=1e-6)


def test_floor_cache_follows_the_weight() -> None:
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(11))
    q = _adaround(w)
    first = q(w).detach()
    with torch.no_grad():
        w.mul_(1.5)  # in place: new version
    assert torch.equal(q(w).detach(), _plain_soft(q, w, q.alpha.detach(), torch.float32))
    assert not torch.equal(q(w).detach(), first)


def test_a_soft_weight_cached_without_grad_is_recomputed_with_grad():
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(12))
    q = _adaround(w)
    with torch.no_grad():
        q(w)  # cached: no graph
    q(w).sum().backward()
    assert q.alpha.grad is not None and torch.count_nonzero(q.alpha.grad) > 0


@pytest.mark.parametrize("p", [0.5, 0.1, 0.75])
def test_keep_mask_elements_are_independent_with_probability_p(p: float) -> None:
    keep = keep_mask((4000, 250), p, torch.Generator().manual_seed(13)).float()
    assert abs(keep.mean().item() - p) < 0.004
    # neighbours (which share a random word) are uncorrelated
    pairs = (keep[:, :-1] * keep[:, 1:]).mean().item()
    assert abs(pairs - p * p) < 0.004


def test_empty_input_has_empty_gradients() -> None:
    x = torch.empty(0, 8, requires_grad=True)
    s1, s2 = torch.tensor(0.3, requires_grad=True), torch.tensor(0.4, requires_grad=True)
    P.fake_quant_hluq(x, torch.tensor(0.0), s1, s2, 8, 4).sum().backward()
    assert x.grad.shape == (0, 8) and s1.grad.item() == 0.0 and s2.grad.item() == 0.0
