"""HLUQ: output-aware grid search (checked by brute force), in-place parameters, gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ahcq.quantization.api import QuantSpec
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.primitives import fake_quant_hluq, fake_quant_uniform
from ahcq.quantization.quantizers import HLUQuantizer, Mode, Role
from ahcq.quantization.quantizers.hluq import Placement

R_SPLITS = (0.05, 0.1, 0.3, 0.5)
G_SPLITS = (1 / 8, 1 / 4, 1 / 2)
REFERENCE = {"range_splits": R_SPLITS, "level_splits": G_SPLITS, "clips": (1.0,), "uniform_candidate": False}


def gelu_batches(n=3, seed=0):
    torch.manual_seed(seed)
    return [F.gelu(torch.randn(32, 24) * 1.5 + 0.3 * i) for i in range(n)]


def brute_force(batches, bits, consumer, clips=None):
    """Running-average range after each batch, every candidate scored, losses summed over batches; keys
    ``(r, n_log)``, or ``(r, n_log, clip)`` when ``clips`` are searched (top at ``lo + clip*(hi - lo)``)."""
    levels = 2**bits
    losses = {}
    mins, maxs = [], []
    for x in batches:
        mins.append(x.min())
        maxs.append(x.max())
        lo, hi = torch.stack(mins).mean(), torch.stack(maxs).mean()
        for r, g, c in itertools.product(R_SPLITS, G_SPLITS, clips or (1.0,)):
            n_log = int(g * levels)
            s1 = r * c * (hi - lo)
            s2 = (1 - r) * c * (hi - lo) / (levels - n_log)
            xq = fake_quant_hluq(x, lo, s1, s2, n_log, bits)
            err = ((consumer(xq).double() - consumer(x).double()) ** 2).mean().item()
            key = (r, n_log) if clips is None else (r, n_log, c)
            losses[key] = losses.get(key, 0.0) + err
    best = min(losses, key=losses.get)
    return best, losses, (lo, hi)


def calibrate(q, batches, **ctx):
    q.set_mode(Mode.CALIBRATE)
    for x in batches:
        q(x, **ctx)
    q.set_mode(Mode.QUANTIZE)


@pytest.mark.parametrize("bits", [4, 6])
def test_grid_search_picks_lowest_next_layer_error(bits):
    batches = gelu_batches()
    torch.manual_seed(9)
    lin = torch.nn.Linear(24, 10)
    q = HLUQuantizer(Role.INPUT, bits, observer="avg_minmax", **REFERENCE)
    calibrate(q, batches, next_layer=lin)
    (r, n_log), losses, (lo, hi) = brute_force(batches, bits, lin)
    assert q.choice == (r, n_log, 1.0, None)
    assert int(q.n_log) == n_log
    assert float(q.x_min) == pytest.approx(float(lo), rel=1e-6)
    assert q.s1.item() == pytest.approx(float(r * (hi - lo)), rel=1e-5)
    assert q.s2.item() == pytest.approx(float((1 - r) * (hi - lo) / (2**bits - n_log)), rel=1e-5)
    assert [q.losses[i].item() for i in range(len(q.candidates))] == pytest.approx(
        [losses[c[:2]] for c in q.candidates], rel=1e-5)


def test_clip_search_scores_every_top_of_the_range():
    """With ``clips``, every (split, top) candidate is scored by the consumer's error and the best one's
    grid is applied; a clip below 1 wins on a tail-heavy input at 4 bits."""
    torch.manual_seed(6)
    batches = [F.gelu(torch.randn(64, 24) * 1.5) * torch.exp(torch.randn(64, 24) * 0.3) for _ in range(3)]
    torch.manual_seed(8)
    lin = torch.nn.Linear(24, 10)
    clips = (1.0, 0.8, 0.6, 0.4)
    q = HLUQuantizer(Role.INPUT, 4, **{**REFERENCE, "clips": clips})
    calibrate(q, batches, next_layer=lin)
    (r, n_log, c), losses, (lo, hi) = brute_force(batches, 4, lin, clips)
    assert q.choice == (r, n_log, c, None) and c < 1.0
    assert [q.losses[i].item() for i in range(len(q.candidates))] == pytest.approx(
        [losses[cand[:3]] for cand in q.candidates], rel=1e-5)
    assert q.s2.item() == pytest.approx(float((1 - r) * c * (hi - lo) / (16 - n_log)), rel=1e-5)


def test_uniform_candidate_carries_a_uniform_grid_exactly_but_its_top_level():
    """The fallback candidates place a uniform grid with code 1 on its lowest level: every value below
    the top level rounds exactly as on the uniform grid."""
    x = gelu_batches(1, seed=7)[0]
    q = HLUQuantizer(Role.INPUT, 6, **{**REFERENCE, "uniform_candidate": True})
    calibrate(q, [x])
    for cand in (c for c in q.candidates if c.placement is Placement.TOP_DROPPED):
        anchor, s1, s2, n_log = q.grid(cand)
        lowest = anchor + s1
        uniform = fake_quant_uniform(x, s2, torch.round(-lowest / s2).to(torch.int32), 0, 63)
        mine = fake_quant_hluq(x, anchor, s1, s2, n_log, 6)
        below_top = x < lowest + (64 - 2.5) * s2
        assert n_log == 2 and torch.allclose(mine[below_top], uniform[below_top], atol=1e-5)


def test_without_next_layer_the_input_error_is_used():
    batches = gelu_batches(2, seed=1)
    q = HLUQuantizer(Role.INPUT, 4, **REFERENCE)
    calibrate(q, batches)
    best, _, _ = brute_force(batches, 4, lambda t: t)
    assert q.choice[:2] == best


def test_quant_linear_passes_itself_as_next_layer():
    batches = gelu_batches(2, seed=2)
    torch.manual_seed(3)
    lin = torch.nn.Linear(24, 6)
    q = HLUQuantizer(Role.INPUT, 4, **REFERENCE)
    layer = QuantLinear.from_float(lin, q)
    q.set_mode(Mode.CALIBRATE)
    for x in batches:
        layer(x)
    q.set_mode(Mode.QUANTIZE)
    best, _, _ = brute_force(batches, 4, lin)
    assert q.choice[:2] == best
    x = batches[0]
    assert torch.equal(layer(x), lin(fake_quant_hluq(x, q.x_min, q.s1, q.s2, int(q.n_log), 4)))


def test_parameters_are_filled_in_place_and_learnable():
    q = HLUQuantizer(Role.INPUT, 4)
    s1, s2 = q.s1, q.s2
    opt = torch.optim.Adam([s1, s2], lr=1e-2)
    batches = gelu_batches(2, seed=4)
    calibrate(q, batches)
    assert q.s1 is s1 and q.s2 is s2
    before = (s1.item(), s2.item())
    x = batches[0] * 3  # values above the top level give s1/s2 gradients
    loss = (q(x) - x).pow(2).sum()
    loss.backward()
    assert s2.grad is not None and s2.grad.abs().item() > 0
    opt.step()
    assert (s1.item(), s2.item()) != before


def test_codes_roundtrip_and_bad_configuration():
    q = HLUQuantizer(Role.INPUT, 4)
    calibrate(q, gelu_batches(1))
    x = gelu_batches(1, seed=5)[0]
    codes = q.quantize_int(x)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(q.dequantize_int(codes), q(x))
    with pytest.raises(ValueError, match="level split"):
        HLUQuantizer(Role.INPUT, 2, level_splits=(1 / 8,), name="mlp.lin2.input_quantizer")
    with pytest.raises(ValueError, match="'hluq' is PerTensor, got PerChannel"):
        QuantSpec(quantizer="hluq", granularity=PerChannel(0))
    with pytest.raises(ValueError, match="'hluq' is asymmetric"):
        QuantSpec(quantizer="hluq", symmetric=True)
