"""LNQ and AGQ: the value-aware search against a brute-force grid, batch accumulation, matmul wiring."""
import numpy as np
import pytest
import torch

from ahcq.quantization.layers import QuantMatMul
from ahcq.quantization.primitives import fake_quant_agq, fake_quant_lnq
from ahcq.quantization.quantizers import AGQuantizer, LNQuantizer, Mode, Role


def attention(seed, heads=2, tokens=16, dim=8, sharp=3.0):
    torch.manual_seed(seed)
    scores = torch.randn(1, heads, tokens, tokens) * sharp
    return torch.softmax(scores, dim=-1), torch.randn(1, heads, tokens, dim)


def value_err(xq, x, v):
    """The references' softmax search criterion: mean |(Q(A) - A) V|^2.4 (PTQ4SAM / AHCQ-SAM)."""
    return float(((torch.matmul(xq - x, v)).double().abs() ** 2.4).mean())


def calibrate(q, pairs):
    q.set_mode(Mode.CALIBRATE)
    for p, v in pairs:
        q(p, value=v)
    q.set_mode(Mode.QUANTIZE)
    return q


def test_lnq_search_is_as_good_as_a_dense_brute_force():
    p, v = attention(0)
    q = calibrate(LNQuantizer(Role.ATTN_PROB, 4, error_p=2.4), [(p, v)])
    chosen = value_err(fake_quant_lnq(p, q.clip, q.alpha, 4), p, v)
    top = p.max().item()
    brute = min(
        value_err(fake_quant_lnq(p, torch.tensor(c), torch.tensor(a), 4), p, v)
        for a in q.alphas for c in np.linspace(0.1 * top, top, 200)
    )
    assert chosen <= brute * 1.02
    # the chosen alpha is the argmin of the per-alpha optima the quantizer recorded
    assert float(q.alpha) == q.alphas[int(torch.argmin(q.search_errors))]
    assert torch.equal(q(p), fake_quant_lnq(p, q.clip, q.alpha, 4))


def test_agq_search_is_as_good_as_a_dense_brute_force():
    p, v = attention(1)
    q = calibrate(AGQuantizer(Role.ATTN_PROB, 4, error_p=2.4), [(p, v)])
    chosen = value_err(fake_quant_agq(p, q.scale.detach(), float(q.tau), 4), p, v)
    top = p.max().item()
    brute = min(
        value_err(fake_quant_agq(p, torch.tensor(s), float(t), 4), p, v)
        for t in (1, 2, 4) for s in np.linspace(min(0.1, 0.01 * top), top, 300)
    )
    assert chosen <= brute * 1.02


def test_value_changes_the_criterion():
    p, v = attention(2)
    with_v = calibrate(LNQuantizer(Role.ATTN_PROB, 3, error_p=2.4), [(p, v)])
    plain = LNQuantizer(Role.ATTN_PROB, 3, error_p=2.4)
    plain.set_mode(Mode.CALIBRATE)
    plain(p)
    plain.set_mode(Mode.QUANTIZE)
    assert not torch.equal(with_v.search_errors, plain.search_errors)
    plain_err = [value_err(fake_quant_lnq(p, torch.tensor(c), torch.tensor(a), 3), p, torch.eye(16))
                 for a, c in zip(plain.alphas, plain.search_sums.tolist())]
    assert plain_err == pytest.approx(plain.search_errors.tolist(), rel=1e-6)


def test_errors_sum_and_clips_average_over_batches():
    pairs = [attention(3), attention(4, sharp=1.0)]
    both = calibrate(LNQuantizer(Role.ATTN_PROB, 4), pairs)
    singles = [calibrate(LNQuantizer(Role.ATTN_PROB, 4), [pair]) for pair in pairs]
    summed = singles[0].search_errors + singles[1].search_errors
    assert both.search_errors.tolist() == pytest.approx(summed.tolist(), rel=1e-9)
    best = int(torch.argmin(both.search_errors))
    mean_clip = (singles[0].search_sums[best] + singles[1].search_sums[best]).item() / 2
    assert float(both.clip) == pytest.approx(mean_clip, rel=1e-6)


def test_matmul_passes_the_value_operand():
    p, v = attention(5)
    mm = QuantMatMul(LNQuantizer(Role.ATTN_PROB, 4), None)
    mm.a_quantizer.set_mode(Mode.CALIBRATE)
    assert torch.equal(mm(p, v), torch.matmul(p, v))
    mm.a_quantizer.set_mode(Mode.QUANTIZE)
    direct = calibrate(LNQuantizer(Role.ATTN_PROB, 4), [(p, v)])
    assert torch.equal(mm.a_quantizer.search_errors, direct.search_errors)
    assert torch.equal(mm(p, v), torch.matmul(direct(p), v))


def test_trainability_and_input_checks():
    p, v = attention(6)
    agq = AGQuantizer(Role.ATTN_PROB, 4)
    scale = agq.scale
    calibrate(agq, [(p, v)])
    assert agq.scale is scale and scale.requires_grad
    lnq = calibrate(LNQuantizer(Role.ATTN_PROB, 4, error_p=2.4), [(p, v)])
    assert not any(True for _ in lnq.parameters())
    codes = lnq.quantize_int(p)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(lnq.dequantize_int(codes), lnq(p))
    bad = LNQuantizer(Role.ATTN_PROB, 4, name="dec.attn.softmax_quantizer")
    bad.set_mode(Mode.CALIBRATE)
    with pytest.raises(ValueError, match="dec.attn.softmax_quantizer.*>= 0"):
        bad(p - 0.5)
    with pytest.raises(ValueError, match="alphas"):
        LNQuantizer(Role.ATTN_PROB, 4, alphas=(1.0, -1.0))


def test_api_builds_lnq_and_agq_without_an_observer():
    from ahcq.quantization.api import QuantSpec, build_quantizer

    q = build_quantizer(QuantSpec(quantizer="lnq", observer="avg_minmax", bits=4), Role.ATTN_PROB, "attn.p")
    assert isinstance(q, LNQuantizer) and q.name == "attn.p" and not hasattr(q, "observer")
    q = build_quantizer(QuantSpec(quantizer="agq", observer="mse", bits=4), Role.ATTN_PROB, "attn.p")
    assert isinstance(q, AGQuantizer) and not hasattr(q, "observer")
    with pytest.raises(TypeError, match="observer"):
        AGQuantizer(Role.ATTN_PROB, 4, observer="mse", name="attn.p")
