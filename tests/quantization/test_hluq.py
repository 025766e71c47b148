"""HLUQ: output-aware grid search (checked by brute force), in-place parameters, gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ahcq.quantization.api import QuantSpec
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.primitives import fake_quant_hluq
from ahcq.quantization.quantizers import HLUQuantizer, Mode, Role

R_SPLITS = (0.05, 0.1, 0.3, 0.5)
G_SPLITS = (1 / 8, 1 / 4, 1 / 2)


def gelu_batches(n=3, seed=0):
    torch.manual_seed(seed)
    return [F.gelu(torch.randn(32, 24) * 1.5 + 0.3 * i) for i in range(n)]


def brute_force(batches, bits, consumer):
    """Running-average range after each batch, every candidate scored, losses summed over batches."""
    levels = 2**bits
    losses = {}
    mins, maxs = [], []
    for x in batches:
        mins.append(x.min())
        maxs.append(x.max())
        lo, hi = torch.stack(mins).mean(), torch.stack(maxs).mean()
        for r, g in itertools.product(R_SPLITS, G_SPLITS):
            n_log = int(g * levels)
            s1 = r * (hi - lo)
            s2 = (1 - r) * (hi - lo) / (levels - n_log)
            xq = fake_quant_hluq(x, lo, s1, s2, n_log, bits)
            err = ((consumer(xq).double() - consumer(x).double()) ** 2).mean().item()
            losses[(r, n_log)] = losses.get((r, n_log), 0.0) + err
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
    q = HLUQuantizer(Role.INPUT, bits, range_splits=R_SPLITS, level_splits=G_SPLITS, observer="avg_minmax")
    calibrate(q, batches, next_layer=lin)
    (r, n_log), losses, (lo, hi) = brute_force(batches, bits, lin)
    assert q.choice == (r, n_log)
    assert int(q.n_log) == n_log
    assert float(q.x_min) == pytest.approx(float(lo), rel=1e-6)
    assert q.s1.item() == pytest.approx(float(r * (hi - lo)), rel=1e-5)
    assert q.s2.item() == pytest.approx(float((1 - r) * (hi - lo) / (2**bits - n_log)), rel=1e-5)
    assert [q.losses[i].item() for i in range(len(q.candidates))] == pytest.approx(
        [losses[c] for c in q.candidates], rel=1e-5)


def test_without_next_layer_the_input_error_is_used():
    batches = gelu_batches(2, seed=1)
    q = HLUQuantizer(Role.INPUT, 4, range_splits=R_SPLITS, level_splits=G_SPLITS)
    calibrate(q, batches)
    best, _, _ = brute_force(batches, 4, lambda t: t)
    assert q.choice == best


def test_quant_linear_passes_itself_as_next_layer():
    batches = gelu_batches(2, seed=2)
    torch.manual_seed(3)
    lin = torch.nn.Linear(24, 6)
    q = HLUQuantizer(Role.INPUT, 4, range_splits=R_SPLITS, level_splits=G_SPLITS)
    layer = QuantLinear.from_float(lin, q)
    q.set_mode(Mode.CALIBRATE)
    for x in batches:
        layer(x)
    q.set_mode(Mode.QUANTIZE)
    best, _, _ = brute_force(batches, 4, lin)
    assert q.choice == best
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
