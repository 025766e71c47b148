"""Inference fast paths give the same bits as the reference paths.

Fast paths: fake-quants without autograd (no graph needed: no grad mode or no input requiring grad), CPU
slicing of large inputs, the cached weight fake-quant, the single-reduction NaN/Inf check and the row
subsampling of the attention searches. References: the autograd path of the same primitive, torch's own
fake-quant ops, and the encoders as first written (below, with boolean selects and masked fills).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ahcq.quantization import api
from ahcq.quantization import primitives as P
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import (
    AdaRoundQuantizer,
    AGQuantizer,
    CAGQuantizer,
    FixedQuantizer,
    HLUQuantizer,
    LNQuantizer,
    LSQQuantizer,
    Mode,
    Role,
)
from ahcq.quantization.quantizers.search import subsample_rows

BIG = (3, 70001)  # more elements than one CPU slice of the no-autograd fake-quants, not a multiple of it
_TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------- reference encoders
def ref_codes_hluq(x, x_min, s1, s2, n_log, bits):
    u = x - x_min
    v = torch.sub(u, s1).div_(s2)
    uniform_code = torch.clamp(torch.round(v), 1, 2**bits - n_log).add_(n_log - 1)
    k = torch.clamp(u, min=_TINY).log2_().neg_().add_(torch.log2(s1)).round_()
    underflow = (k >= n_log - 1) | (u <= 0)
    log_code = torch.clamp(k, min=0.0).neg_().add_(n_log - 1).masked_fill_(underflow, 0.0)
    return torch.where(u > s1 + s2 / 2, uniform_code, log_code).to(torch.int32)


def ref_codes_agq(x, scale, tau, bits):
    top = 2**bits - 1
    k = torch.clamp(x, min=_TINY).log2_().sub_(torch.log2(scale)).mul_(-tau).round_()
    underflow = (k >= top) | (x <= 0)
    return torch.clamp(k, min=0.0).neg_().add_(top).masked_fill_(underflow, 0.0).to(torch.int32)


def ref_codes_lnq(x, clip, alpha, bits):
    top = 2**bits - 1
    t = torch.minimum(x, clip).clamp_(min=0.0).mul_(alpha).log1p_().div_(torch.log1p(alpha * clip))
    return torch.mul(t, top).round_().to(torch.int32)


def with_graph(fn, x, *params):
    """``fn`` on copies of ``x`` and ``params`` that require grad: the autograd path."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    out = fn(*leaves)
    assert out.requires_grad
    return out.detach()


def gelu_like(shape, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = F.gelu(torch.randn(shape, generator=g) * spread)
    edge = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 0.5, 2.5, float(x.min())])
    x.view(-1)[: edge.numel()] = edge
    return x


def probs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(shape, generator=g) * 4, dim=-1)
    p.view(-1)[:3] = torch.tensor([0.0, 1e-40, 1.0])
    return p


# --------------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("shape", [(40, 50), BIG])
@pytest.mark.parametrize("bits,n_log", [(2, 2), (4, 2), (4, 8), (4, 15), (8, 32), (8, 128)])
@pytest.mark.parametrize("r", [0.001, 0.1, 0.6])
def test_hluq_fast_path_matches_reference_and_graph_path(shape, bits, n_log, r):
    x = gelu_like(shape, seed=bits * 100 + n_log)
    x_min = x.min() + (0.05 if r == 0.6 else 0.0)  # some values below x_min
    span = x.max() - x_min
    s1, s2 = r * span, (1 - r) * span / (2**bits - n_log)
    with torch.no_grad():
        fast = P.fake_quant_hluq(x, x_min, s1, s2, n_log, bits)
    ref = P.dequantize_hluq(ref_codes_hluq(x, x_min, s1, s2, n_log, bits), x_min, s1, s2, n_log, bits)
    graph = with_graph(lambda *t: P.fake_quant_hluq(*t, n_log, bits), x, x_min, s1, s2)
    assert torch.equal(fast, ref)
    assert torch.equal(graph, ref)
    assert torch.equal(P.quantize_hluq(x, x_min, s1, s2, n_log, bits),
                       ref_codes_hluq(x, x_min, s1, s2, n_log, bits))


@pytest.mark.parametrize("shape", [(40, 50), BIG])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("scale", [0.02, 0.7])
def test_agq_fast_path_matches_reference_and_graph_path(shape, bits, tau, scale):
    p, s = probs(shape, seed=bits), torch.tensor(scale)
    with torch.no_grad():
        fast = P.fake_quant_agq(p, s, tau, bits)
    ref = P.dequantize_agq(ref_codes_agq(p, s, tau, bits), s, tau, bits)
    assert torch.equal(fast, ref)
    assert torch.equal(with_graph(lambda *t: P.fake_quant_agq(*t, tau, bits), p, s), ref)
    assert torch.equal(P.quantize_agq(p, s, tau, bits), ref_codes_agq(p, s, tau, bits))


@pytest.mark.parametrize("family", ["hluq", "agq"])
@pytest.mark.parametrize("scale", [1e-36, 3e-37])
def test_log_encoders_keep_zero_codes_when_the_log_floor_has_a_code(family, scale):
    """With a scale near float32's smallest normal number the floor every ``x <= 0`` is clamped to encodes
    above 0 (the no-grad encoders' mask-free shortcut does not apply): ``x <= 0`` must still give code 0."""
    g = torch.Generator().manual_seed(7)
    x = torch.cat([scale * torch.exp2(torch.rand(70000, generator=g) * 12 - 9),
                   torch.tensor([0.0, -0.0, -1.0, -1e-40, 1e-45, 1e-40, _TINY])])
    s = torch.tensor(scale)
    if family == "hluq":
        args, ref_codes = (torch.tensor(0.0), s, s / 4, 8, 4), ref_codes_hluq
        encode, decode, fake = P.quantize_hluq, P.dequantize_hluq, P.fake_quant_hluq
    else:
        args, ref_codes = (s, 1.0, 4), ref_codes_agq
        encode, decode, fake = P.quantize_agq, P.dequantize_agq, P.fake_quant_agq
    assert int(encode(torch.tensor([_TINY]), *args)) > 0  # the floor's own code
    ref = ref_codes(x, *args)
    assert torch.equal(encode(x, *args), ref)
    assert (ref[-7:-3] == 0).all() and (ref[-3:] > 0).all()  # x <= 0 -> 0; positive subnormals -> the floor
    with torch.no_grad():
        assert torch.equal(fake(x, *args), decode(ref, *args))


@pytest.mark.parametrize("shape", [(40, 50), BIG])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("alpha", [0.001, 20.0, 200.0])
@pytest.mark.parametrize("clip", [0.05, 0.9])
def test_lnq_fast_path_matches_reference_and_graph_path(shape, bits, alpha, clip):
    p, c, a = probs(shape, seed=bits), torch.tensor(clip), torch.tensor(alpha)
    with torch.no_grad():
        fast = P.fake_quant_lnq(p, c, a, bits)
    ref = P.dequantize_lnq(ref_codes_lnq(p, c, a, bits), c, a, bits)
    assert torch.equal(fast, ref)
    assert torch.equal(with_graph(lambda x, cl: P.fake_quant_lnq(x, cl, a, bits), p, c), ref)
    assert torch.equal(P.quantize_lnq(p, c, a, bits), ref_codes_lnq(p, c, a, bits))


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_sliced_fast_path_handles_non_contiguous_input(layout):
    p = probs((5, 301, 257))
    p = {"transposed": p.transpose(1, 2), "strided": p[:, ::2], "expanded": p[:1].expand(3, -1, -1)}[layout]
    assert not p.is_contiguous() and p.numel() > 65536
    c, a = torch.tensor(0.7), torch.tensor(30.0)
    with torch.no_grad():
        fast = P.fake_quant_lnq(p, c, a, 4)
        uniform = P.fake_quant_uniform(p, c / 15, torch.tensor(0.0), 0, 15)
    assert fast.shape == p.shape
    assert torch.equal(fast, P.dequantize_lnq(ref_codes_lnq(p, c, a, 4), c, a, 4))
    assert torch.equal(uniform, torch.fake_quantize_per_tensor_affine(p, float(c / 15), 0, 0, 15))


@pytest.mark.parametrize("windows,tokens,heads", [(256, 64, 1), (1, 1024, 4), (9, 196, 4)])
def test_qkv_slices_are_walked_in_blocks_into_a_contiguous_result(windows, tokens, heads):
    """q, k and v of a Hiera qkv projection (``[windows, heads, tokens, 96]`` views with a gap between rows)
    are read in place, block by block (some blocks split a head's tokens), into a contiguous result."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(windows, tokens, 3 * heads * 96, generator=g) * 2
    for t in torch.unbind(qkv.reshape(windows, tokens, 3, heads, 96), 2):
        t = t.transpose(1, 2)
        assert not t.is_contiguous() and not t.permute(0, 2, 1, 3).is_contiguous()
        x_min, span = t.min(), t.max() - t.min()
        s1, s2 = 0.1 * span, 0.9 * span / 8
        with torch.no_grad():
            uniform = P.fake_quant_uniform(t, span / 15, torch.tensor(7.0), 0, 15)
            hluq = P.fake_quant_hluq(t, x_min, s1, s2, 8, 4)
        assert uniform.is_contiguous() and hluq.is_contiguous()
        assert torch.equal(uniform, torch.fake_quantize_per_tensor_affine(t, float(span / 15), 7, 0, 15))
        args = (x_min, s1, s2, 8, 4)
        assert torch.equal(hluq, P.dequantize_hluq(ref_codes_hluq(t, *args), *args))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_checking_finite_rejects_nan_and_inf_in_any_slice(layout):
    """Inside ``checking_finite`` the sliced fake-quants check every slice before encoding it; values whose
    sum overflows are still finite; paths without slices (autograd) leave the check to the caller."""
    base = probs((4, 70001))
    x = base if layout == "contiguous" else base[:, ::2]
    c, a = torch.tensor(0.7), torch.tensor(30.0)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone() if layout == "contiguous" else base.clone()[:, ::2]
        y[-1, -1] = bad  # in the last slice
        with torch.no_grad(), P.checking_finite(), pytest.raises(P.NonFiniteInputError):
            P.fake_quant_lnq(y, c, a, 4)
        with torch.no_grad(), P.checking_finite(), pytest.raises(P.NonFiniteInputError):
            P.fake_quant_uniform(y, c / 15, torch.tensor(0.0), 0, 15)
    huge = torch.full((3, 70001), 3e38)
    with torch.no_grad(), P.checking_finite() as check:
        out = P.fake_quant_uniform(huge, torch.tensor(1e37), torch.tensor(0.0), 0, 255)
    assert check.done and torch.equal(out, torch.fake_quantize_per_tensor_affine(huge, 1e37, 0, 0, 255))
    with P.checking_finite() as check:
        P.fake_quant_lnq(x.clone().requires_grad_(), c, a, 4)
    assert not check.done


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(30, 7, 16), BIG])
def test_uniform_fast_path_matches_torch_and_graph_path(symmetric, bits, shape):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30])
    qmin, qmax = P.qrange(bits, symmetric)
    s, z = P.qparams_from_minmax(x.min(), x.max(), bits, symmetric)
    for scale in (s, s / 7):
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(z), qmin, qmax)
        with torch.no_grad():
            assert torch.equal(P.fake_quant_uniform(x, scale, z, qmin, qmax), ref)
        graph = with_graph(lambda xx, ss: P.fake_quant_uniform(xx, ss, z, qmin, qmax), x, scale)
        assert torch.equal(graph, ref)
    ch_min, ch_max = x.reshape(-1, shape[-1]).aminmax(dim=0)
    s, z = P.qparams_from_minmax(ch_min, ch_max, bits, symmetric)
    ref = torch.fake_quantize_per_channel_affine(x, s, z.int(), x.dim() - 1, qmin, qmax)
    with torch.no_grad():
        assert torch.equal(P.fake_quant_uniform(x, s, z, qmin, qmax, axis=-1), ref)
    assert torch.equal(with_graph(lambda xx, ss: P.fake_quant_uniform(xx, ss, z, qmin, qmax, -1), x, s), ref)


# --------------------------------------------------------------------------------- quantizer modules
def calibrate(q, *batches, **ctx):
    q.set_mode(Mode.CALIBRATE)
    with torch.no_grad():
        for b in batches:
            q(b, **ctx)
    q.set_mode(Mode.QUANTIZE)
    return q


CASES = ["lsq per tensor", "fixed per channel", "cag", "hluq", "lnq", "agq"]


def make_case(case):
    """A calibrated quantizer of the family and an input for it."""
    act = torch.randn(4, 9, 24, generator=torch.Generator().manual_seed(3))
    hidden, p = gelu_like((64, 1100), seed=5), probs((2, 3, 40, 40), seed=6)
    if case == "lsq per tensor":
        return calibrate(LSQQuantizer(Role.INPUT, 4, name="m.lsq"), act), act
    if case == "fixed per channel":
        return calibrate(FixedQuantizer(Role.INPUT, 4, ch_axis=-1, name="m.fixed"), act), act
    if case == "cag":
        cag = calibrate(CAGQuantizer(Role.INPUT, 4, groups=2, name="m.cag"), act)
        cag.regroup(3)
        return cag, act
    if case == "hluq":
        return calibrate(HLUQuantizer(Role.INPUT, 4, name="m.hluq"), hidden), hidden
    if case == "lnq":
        return calibrate(LNQuantizer(Role.ATTN_PROB, 4, alphas=(1.0, 20.0), name="m.lnq"), p), p
    return calibrate(AGQuantizer(Role.ATTN_PROB, 4, name="m.agq"), p), p


@pytest.mark.parametrize("case", CASES)
def test_quantizer_fast_path_equals_graph_path(case):
    q, x = make_case(case)
    with torch.inference_mode():
        fast = q(x)
    with torch.no_grad():
        no_grad = q(x)
    graph = q(x.clone().requires_grad_())
    assert graph.requires_grad
    assert torch.equal(fast, graph.detach())
    assert torch.equal(no_grad, graph.detach())
    assert torch.equal(q.dequantize_int(q.quantize_int(x)), fast)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_naming_the_quantizer_in_every_active_mode(case, bad):
    q, x = make_case(case)
    x.view(-1)[7] = bad
    for mode in (Mode.QUANTIZE, Mode.DROP):
        q.set_mode(mode, drop_p=0.5 if mode is Mode.DROP else 0.0)
        for ctx in (torch.inference_mode, torch.no_grad, torch.enable_grad):
            with ctx(), pytest.raises(ValueError, match=rf"{q.name}.*NaN or Inf"):
                q(x)
    q.set_mode(Mode.CALIBRATE)
    with pytest.raises(ValueError, match=rf"{q.name}.*NaN or Inf"):
        q(x)


def test_finite_check_survives_an_overflowing_sum():
    q = calibrate(FixedQuantizer(Role.INPUT, 8, name="m.big"), torch.tensor([-1.0, 1.0]))
    x = torch.full((16,), 3e38)  # finite, but its sum overflows to inf
    assert torch.isinf(x.sum())
    ref = torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), 0, 255)
    for ctx in (torch.enable_grad, torch.no_grad):  # whole-tensor check; check fused into the slices
        with ctx():
            assert torch.equal(q(x), ref)
    x[3] = math.nan
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx(), pytest.raises(ValueError, match="m.big"):
            q(x)


# --------------------------------------------------------------------------------- weight cache
def hardened_layer(seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(24, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 24, generator=g))
    wq = AdaRoundQuantizer(Role.WEIGHT, bits, observer="minmax", name="lin.weight_quantizer")
    layer = QuantLinear.from_float(lin, weight_quantizer=wq)
    calibrate(wq, layer.weight)
    with torch.no_grad():
        wq.alpha.add_(torch.randn(wq.alpha.shape, generator=g))
    wq.harden()
    return layer, wq


def recomputed(q, w):
    """The weight fake-quant computed afresh, bypassing the cache."""
    return q.fake_quant(w).detach()


def test_hardened_adaround_weight_is_cached_and_equals_recomputed():
    layer, wq = hardened_layer()
    first = wq(layer.weight)
    assert wq(layer.weight) is first  # cache hit: with grad enabled too, the hard output has no graph
    with torch.inference_mode():
        inf_first = wq(layer.weight)
        assert wq(layer.weight) is inf_first
    assert torch.equal(first, recomputed(wq, layer.weight))
    assert torch.equal(inf_first, first)
    grid = wq.grid_value(layer.weight)
    ref = torch.fake_quantize_per_channel_affine(grid, wq.scale, wq.zero_point, 0, 0, 15)
    assert torch.equal(first, ref)


def test_inference_cache_is_not_reused_under_autograd():
    layer, wq = hardened_layer()
    with torch.inference_mode():
        cached = wq(layer.weight)
    x = torch.randn(5, 24, requires_grad=True)
    out = layer(x)  # would fail to save an inference tensor for backward
    out.sum().backward()
    assert wq(layer.weight) is not cached
    assert x.grad is not None


def test_cache_invalidated_by_in_place_weight_edit_and_data_swap():
    layer, wq = hardened_layer()
    before = wq(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    after = wq(layer.weight)
    assert after is not before and not torch.equal(after, before)
    assert torch.equal(after, recomputed(wq, layer.weight))
    layer.weight.data = layer.weight.data * 0.5
    swapped = wq(layer.weight)
    assert torch.equal(swapped, recomputed(wq, layer.weight)) and not torch.equal(swapped, after)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="lin.weight_quantizer"):
        wq(layer.weight)


def test_cache_invalidated_by_quantizer_state_changes():
    layer, wq = hardened_layer()
    hard = wq(layer.weight)
    wq.hard.fill_(False)  # back to soft rounding
    soft = wq(layer.weight)
    assert not torch.equal(soft, hard) and torch.equal(soft, recomputed(wq, layer.weight))
    wq.harden()
    with torch.no_grad():
        wq.alpha.neg_()
    flipped = wq(layer.weight)
    assert not torch.equal(flipped, hard) and torch.equal(flipped, recomputed(wq, layer.weight))
    state = {k: v.clone() for k, v in wq.state_dict().items()}
    state["alpha"] = -state["alpha"]
    wq.load_state_dict(state)
    assert torch.equal(wq(layer.weight), hard)
    wq.scale = wq.scale * 2
    assert torch.equal(wq(layer.weight), recomputed(wq, layer.weight))
    assert not torch.equal(wq(layer.weight), hard)


def test_cache_dropped_on_mode_changes():
    layer, wq = hardened_layer()
    cached = wq(layer.weight)
    with api.quantization_disabled(layer):
        assert wq(layer.weight) is layer.weight
    again = wq(layer.weight)
    assert again is not cached and torch.equal(again, cached)
    wq.set_mode(Mode.QUANTIZE)
    assert wq(layer.weight) is not again
    third = wq(layer.weight)
    wq.eval()
    assert wq(layer.weight) is not third


def test_cache_dropped_by_regroup_and_explicit_clear():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    q = calibrate(CAGQuantizer(Role.WEIGHT, 4, groups=2, name="w.cag"), w)
    with torch.no_grad():
        per_channel = q(w)
        assert q(w) is per_channel
        q.regroup(2)  # rewrites the scale through .data
        grouped = q(w)
        assert not torch.equal(grouped, per_channel) and torch.equal(grouped, recomputed(q, w))
        q.scale.data.mul_(2)  # unversioned: the cache cannot see it ...
        assert q(w) is grouped
        q.clear_cache()  # ... until cleared
        assert torch.equal(q(w), recomputed(q, w)) and not torch.equal(q(w), grouped)


def test_copies_leave_the_cache_behind():
    layer, wq = hardened_layer()
    cached = wq(layer.weight)
    twin = copy.deepcopy(wq)
    assert twin.__dict__["_weight_cache"] is None and twin.mode is Mode.QUANTIZE
    assert wq(layer.weight) is cached
    assert torch.equal(twin(layer.weight), cached)


def test_no_cache_when_the_output_needs_a_graph():
    w = torch.randn(8, 16)
    q = calibrate(LSQQuantizer(Role.WEIGHT, 4, ch_axis=0, name="w.lsq"), w)
    first, second = q(w), q(w)
    assert first.requires_grad and second is not first
    (first.sum() + second.sum()).backward()  # two independent graphs
    assert q.scale.grad is not None
    with torch.no_grad():
        cached = q(w)
        assert q(w) is cached
        q.scale.mul_(2)
        assert torch.equal(q(w), recomputed(q, w)) and not torch.equal(q(w), cached)


def test_activation_quantizers_are_not_cached():
    x = torch.randn(6, 10)
    q = calibrate(FixedQuantizer(Role.INPUT, 4, name="a.fixed"), x)
    with torch.no_grad():
        first = q(x)
        assert q(x) is not first
        x.mul_(2)
        assert torch.equal(q(x), recomputed(q, x)) and not torch.equal(q(x), first)


# --------------------------------------------------------------------------------- search subsampling
def test_subsample_rows_keeps_small_inputs_and_caps_large_ones():
    g = torch.Generator().manual_seed(0)
    x, v = torch.rand(2, 3, 10, 7, generator=g), torch.rand(2, 3, 7, 5, generator=g)
    sx, sv = subsample_rows(x, v, max_rows=60)
    assert sx is x and sv is v
    sx, sv = subsample_rows(x, v, max_rows=13)
    assert sx.shape[0] * sx.shape[1] <= 13 and sv.shape[0] == sx.shape[0]
    # every kept row is a row of x, paired with its own value matrix
    rows = x.reshape(6, 10, 7)
    for i in range(sx.shape[0]):
        lead = [j for j in range(6) if any(torch.equal(r, sx[i, 0]) for r in rows[j])]
        assert len(lead) == 1 and torch.equal(sv[i], v.reshape(6, 7, 5)[lead[0]])
    again = subsample_rows(x, v, max_rows=13)
    assert torch.equal(again[0], sx) and torch.equal(again[1], sv)
    other = subsample_rows(x, v, max_rows=13, seed=1)[0]
    assert not torch.equal(other, sx)
    few = subsample_rows(x, v, max_rows=3)[0]  # fewer rows than heads: one query of 3 heads
    assert few.shape[:2] == (3, 1)


def test_lnq_search_on_a_large_map_uses_the_cap_and_is_deterministic(monkeypatch):
    import ahcq.quantization.quantizers.search as search

    p, v = probs((1, 2, 300, 64), seed=2), torch.randn(1, 2, 64, 16)
    seen = []
    real = search.value_error

    def spy(xq, x, value, p):
        seen.append(x.shape)
        return real(xq, x, value, p)

    monkeypatch.setattr("ahcq.quantization.quantizers.probability.value_error", spy)
    monkeypatch.setattr(search, "SEARCH_MAX_ROWS", 100)
    clips = []
    for _ in range(2):
        q = LNQuantizer(Role.ATTN_PROB, 4, alphas=(1.0, 20.0), name="attn.lnq")
        calibrate(q, p, value=v)
        clips.append((float(q.clip), float(q.alpha)))
    assert clips[0] == clips[1]
    assert seen and all(s[0] * s[1] <= 100 for s in seen)
