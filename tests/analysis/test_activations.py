"""Activation capture and statistics against independent numpy references, on real quantized layers."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from ahcq.analysis.activations import (
    capture,
    channel_ranges,
    find_quantizers,
    pairwise_param_cosine,
    per_sample_qparams,
)
from ahcq.quantization import api
from ahcq.quantization.granularity import ChannelGroups, PerChannel
from ahcq.quantization.quantizers import CAGQuantizer, LSQQuantizer, Role, make_quantizer


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    return api.quantize(model, api.QuantSpec(bits=4), api.QuantSpec(bits=4, granularity=PerChannel(0)),
                        overrides=[("0", {"act": {"quantizer": "cag", "granularity": ChannelGroups(2)}})])


def test_capture_sees_the_slot_input_and_feeds_twins_the_same_tensor(generator: torch.Generator) -> None:
    model = _model()
    inputs = [torch.randn(2, 4, 6, generator=generator) * (i + 1) for i in range(3)]
    hidden = [nn.functional.gelu(model[0].to_float()(x)) for x in inputs]
    twin = make_quantizer("fixed", Role.INPUT, 8, observer="minmax", name="twin")
    with api.calibrating(nn.ModuleList([twin])):
        acts = capture(model, ["0.input_quantizer", "2.input_quantizer"], inputs, model,
                       twins={"2.input_quantizer": twin})
    for got, x in zip(acts["0.input_quantizer"], inputs):
        np.testing.assert_array_equal(got.numpy(), x.reshape(-1, 6).numpy())
    for got, h in zip(acts["2.input_quantizer"], hidden):
        np.testing.assert_allclose(got.numpy(), h.detach().reshape(-1, 5).numpy(), rtol=1e-6, atol=1e-6)
    all_hidden = torch.cat(hidden).detach().numpy()
    lo, hi = twin.observer.range()
    assert float(lo) == pytest.approx(all_hidden.min()) and float(hi) == pytest.approx(all_hidden.max())


def test_capture_names_a_slot_the_forward_never_reaches() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="2.input_quantizer"):
        capture(model, ["2.input_quantizer"], [torch.zeros(1, 6)], lambda x: model[0](x))
    with pytest.raises(KeyError, match="nope"):
        capture(model, ["nope"], [torch.zeros(1, 6)], model)


def test_find_quantizers_checks_the_family() -> None:
    model = _model()
    assert isinstance(find_quantizers(model, ["0.input_quantizer"], CAGQuantizer)["0.input_quantizer"],
                      CAGQuantizer)
    with pytest.raises(ValueError, match="lsq, not cag"):
        find_quantizers(model, ["2.input_quantizer"], CAGQuantizer)
    with pytest.raises(KeyError, match="missing"):
        find_quantizers(model, ["missing"], LSQQuantizer)


def test_channel_ranges_equal_numpy_min_max(generator: torch.Generator) -> None:
    per_sample = [torch.randn(n, 7, generator=generator) * torch.arange(1, 8) for n in (3, 9, 1)]
    lo, hi = channel_ranges(per_sample)
    stacked = np.concatenate([x.numpy() for x in per_sample])
    np.testing.assert_array_equal(lo.numpy(), stacked.min(axis=0))
    np.testing.assert_array_equal(hi.numpy(), stacked.max(axis=0))


def test_per_sample_minmax_qparams_follow_each_sample_alone(generator: torch.Generator) -> None:
    per_sample = [torch.randn(50, 4, generator=generator) + shift for shift in (0.0, 3.0, -2.0)]
    scale, zero_point = per_sample_qparams(per_sample, bits=4, observer="minmax")
    assert scale.shape == zero_point.shape == (3, 4)
    for i, x in enumerate(per_sample):
        lo = np.minimum(x.numpy().min(axis=0), 0.0)
        hi = np.maximum(x.numpy().max(axis=0), 0.0)
        np.testing.assert_allclose(scale[i].numpy(), (hi - lo) / 15, rtol=1e-6)
        np.testing.assert_array_equal(zero_point[i].numpy(), np.clip(np.round(-lo / ((hi - lo) / 15)), 0, 15))


def test_per_sample_mse_ranges_stay_inside_each_sample_range(generator: torch.Generator) -> None:
    per_sample = [torch.randn(200, 3, generator=generator) * s for s in (1.0, 4.0)]
    scale, zero_point = per_sample_qparams(per_sample, bits=4, observer="mse")
    for i, x in enumerate(per_sample):
        lo, hi = scale[i] * (0 - zero_point[i]), scale[i] * (15 - zero_point[i])
        assert (lo >= torch.clamp(x.min(0).values, max=0) - 1e-5).all()
        assert (hi <= torch.clamp(x.max(0).values, min=0) + 1e-5).all()
        assert ((hi - lo) < (x.max(0).values - x.min(0).values)).any()  # MSE clips somewhere


@pytest.mark.parametrize("symmetric", [False, True])
def test_pairwise_cosine_equals_a_numpy_computation(rng: np.random.Generator, symmetric: bool) -> None:
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    scale = torch.from_numpy(rng.uniform(0.01, 2.0, (4, 6))).float()
    zero_point = torch.from_numpy(rng.integers(qmin, qmax + 1, (4, 6))).float()
    got = pairwise_param_cosine(scale, zero_point, bits=4, symmetric=symmetric)
    s, z = scale.double().numpy(), zero_point.double().numpy()
    assert got.shape == (6, 6)
    for c in range(6):
        for k, (i, j) in enumerate(itertools.combinations(range(4), 2)):
            a = np.array([s[i, c] / s[:, c].max(), (z[i, c] - qmin) / 15])
            b = np.array([s[j, c] / s[:, c].max(), (z[j, c] - qmin) / 15])
            assert got[c, k] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)


def test_pairwise_cosine_is_one_for_identical_samples_and_needs_two() -> None:
    scale, zero_point = torch.rand(1, 5) + 0.1, torch.randint(0, 16, (1, 5)).float()
    same = pairwise_param_cosine(scale.repeat(3, 1), zero_point.repeat(3, 1), bits=4)
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_param_cosine(scale, zero_point, bits=4)
