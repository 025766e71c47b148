"""Observers against numpy statistics, a brute-force MSE grid and the degenerate inputs calibration meets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ahcq.quantization import observers as O
from ahcq.quantization.primitives import qrange

KINDS = ["minmax", "avg_minmax", "mse", "avg_mse", "percentile"]


def _lp_error(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool,
              axis: int | None, p: float = 2.4) -> np.ndarray:
    """Mean |fake_quant(x) - x|^p per channel, with torch's own fake-quant op and numpy."""
    qmin, qmax = qrange(bits, symmetric)
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
        return np.array([np.mean(np.abs(y.double().numpy() - x.double().numpy()) ** p)])
    y = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis, qmin, qmax)
    err = np.abs(y.double().numpy() - x.double().numpy()) ** p
    return np.moveaxis(err, axis, 0).reshape(x.shape[axis], -1).mean(axis=1)


def test_registry_names() -> None:
    assert sorted(O.OBSERVERS) == sorted(KINDS)
    assert O.OBSERVERS["avg_minmax"] is O.AvgMinMaxObserver
    with pytest.raises(ValueError, match="unknown observer 'histogram'"):
        O.make_observer("histogram")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("case", ["zeros", "constant", "negative_constant", "all_negative"])
def test_degenerate_inputs_give_valid_grids(kind: str, symmetric: bool, axis: int | None, case: str) -> None:
    data = {
        "zeros": torch.zeros(16, 4),
        "constant": torch.full((16, 4), 3.25),
        "negative_constant": torch.full((16, 4), -0.5),
        "all_negative": -torch.rand(16, 4) - 0.1,
    }[case]
    obs = O.make_observer(kind, bits=4, symmetric=symmetric, axis=axis, name="blk.fc")
    obs.observe(data)
    obs.observe(data)
    scale, zp = obs.qparams()
    qmin, qmax = qrange(4, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(zp, torch.round(zp)) and (zp >= qmin).all() and (zp <= qmax).all()
    assert scale.shape == ((4,) if axis is not None else ())
    if kind == "minmax":  # every observed value lies inside the grid: error at most half a step
        err = _lp_error(data, scale, zp, 4, symmetric, axis, p=1.0)
        limit = scale.numpy() if symmetric else scale.numpy() / 2
        assert np.all(np.abs(data.numpy()).max() == 0 or err <= limit * (1 + 1e-5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_raises_naming_the_observer(kind: str, bad: float) -> None:
    obs = O.make_observer(kind, bits=4, axis=0, name="decoder.layers.1.mlp.lin2.input")
    x = torch.randn(3, 5)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.lin2\.input.*NaN or Inf"):
        obs.observe(x)


def test_bad_usage_errors_name_the_observer() -> None:
    obs = O.MinMaxObserver(axis=1, name="q")
    with pytest.raises(RuntimeError, match="'q' has not observed"):
        obs.range()
    with pytest.raises(ValueError, match="'q'.*floating-point"):
        obs.observe(torch.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="'q'.*axis 1 out of range"):
        obs.observe(torch.randn(4))
    obs.observe(torch.randn(2, 3))
    with pytest.raises(ValueError, match="'q'.*channel count changed"):
        obs.observe(torch.randn(2, 4))
    with pytest.raises(ValueError, match="'q'.*empty"):
        obs.observe(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="needs a channel axis"):
        O.MinMaxObserver(group_index=torch.tensor([0, 1]), name="g")
    with pytest.raises(ValueError, match="every group"):
        O.MinMaxObserver(axis=0, group_index=torch.tensor([0, 2, 2]), name="g")
    with pytest.raises(ValueError, match="bits"):
        O.MinMaxObserver(bits=1)
    mse = O.MSEObserver(bits=4, name="w")
    mse.observe(torch.randn(10))
    with pytest.raises(ValueError, match="'w' searched ranges for bits=4"):
        mse.qparams(8, False)


def test_reset_forgets_batches() -> None:
    obs = O.MinMaxObserver(name="a")
    obs.observe(torch.tensor([-5.0, 5.0]))
    obs.reset()
    obs.observe(torch.tensor([-1.0, 2.0]))
    assert [v.item() for v in obs.range()] == [-1.0, 2.0]


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_minmax_and_avg_minmax_against_numpy(axis: int | None) -> None:
    batches = [torch.randn(6, 5) * (i + 1) + i for i in range(4)]
    mm, avg = O.MinMaxObserver(axis=axis), O.AvgMinMaxObserver(axis=axis)
    for b in batches:
        mm.observe(b)
        avg.observe(b)
    stack = np.stack([b.numpy() for b in batches])  # [batch, 6, 5]
    if axis is None:
        reduce = (1, 2)
    else:
        reduce = (1,) if axis == -1 else (2,)
    per_batch_min, per_batch_max = stack.min(axis=reduce), stack.max(axis=reduce)
    np.testing.assert_allclose(mm.range()[0].numpy(), per_batch_min.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(mm.range()[1].numpy(), per_batch_max.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(avg.range()[0].numpy(), per_batch_min.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(avg.range()[1].numpy(), per_batch_max.mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_group_range_is_union_of_channel_ranges(kind: str) -> None:
    channels = 12
    index = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3])
    scales = torch.linspace(0.1, 3.0, channels)
    batches = [torch.randn(40, channels) * scales + torch.randn(channels) for _ in range(3)]
    per_channel = O.make_observer(kind, bits=4, axis=-1, name="c")
    grouped = O.make_observer(kind, bits=4, axis=-1, group_index=index, name="g")
    for b in batches:
        per_channel.observe(b)
        grouped.observe(b)
    lo_c, hi_c = (t.numpy() for t in per_channel.range())
    lo_g, hi_g = grouped.range()
    assert lo_g.shape == hi_g.shape == (4,)
    for g in range(4):
        members = (index == g).numpy()
        assert lo_g[g].item() == lo_c[members].min()
        assert hi_g[g].item() == hi_c[members].max()
    scale, zp = grouped.qparams()
    assert scale.shape == zp.shape == (4,)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_percentile_against_numpy(axis: int | None) -> None:
    x = torch.randn(300, 7) ** 3
    obs = O.PercentileObserver(axis=axis, lower=1.0, upper=99.0)
    obs.observe(x)
    xn = x.double().numpy()
    reduce = None if axis is None else 1 - axis  # numpy reduces over the axis the observer keeps
    lo, hi = obs.range()
    np.testing.assert_allclose(lo.numpy(), np.percentile(xn, 1.0, axis=reduce), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi.numpy(), np.percentile(xn, 99.0, axis=reduce), rtol=1e-5, atol=1e-6)


def test_percentile_running_mean_over_batches() -> None:
    batches = [torch.randn(1000) * (i + 1) for i in range(3)]
    obs = O.PercentileObserver()  # defaults 0.01 / 99.99
    for b in batches:
        obs.observe(b)
    expected_lo = np.mean([np.percentile(b.double().numpy(), 0.01) for b in batches])
    expected_hi = np.mean([np.percentile(b.double().numpy(), 99.99) for b in batches])
    assert obs.range()[0].item() == pytest.approx(expected_lo, rel=1e-5)
    assert obs.range()[1].item() == pytest.approx(expected_hi, rel=1e-5)


def test_subsample_keeps_whole_columns() -> None:
    x = torch.arange(5 * 1000, dtype=torch.float32).reshape(5, 1000)
    assert O._subsample(x, 10_000) is x
    sub = O._subsample(x, 500)
    assert sub.shape == (5, 100)
    cols = sub[0].long()
    assert torch.equal(sub, x[:, cols]) and cols.unique().numel() == 100
    assert torch.equal(O._subsample(x, 500), sub)  # seeded: deterministic


@pytest.mark.slow
def test_percentile_beyond_quantile_size_limit() -> None:
    x = torch.randn(2**24 + 4096)
    obs = O.PercentileObserver(lower=1.0, upper=99.0)
    obs.observe(x)  # torch.quantile alone would refuse this tensor
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(np.percentile(x.numpy(), 1.0), abs=5e-3)
    assert hi.item() == pytest.approx(np.percentile(x.numpy(), 99.0), abs=5e-3)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,gain", [(3, 0.8), (4, 0.95), (6, 1.0)])
def test_mse_per_channel_weights_never_worse_than_minmax(symmetric: bool, bits: int, gain: float) -> None:
    sigma = torch.linspace(0.01, 0.2, 32)[:, None]
    w = torch.randn(32, 256) * sigma
    w[:, 0] = 6 * sigma[:, 0]  # one 6-sigma outlier per channel: min-max spends its levels on it
    mse, mm = O.MSEObserver(bits=bits, symmetric=symmetric, axis=0), O.MinMaxObserver(axis=0)
    mse.observe(w)
    mm.observe(w)
    err_mse = _lp_error(w, *mse.qparams(), bits, symmetric, axis=0)
    err_mm = _lp_error(w, *mm.qparams(bits, symmetric), bits, symmetric, axis=0)
    assert np.all(err_mse <= err_mm * (1 + 1e-6))
    assert (err_mse / err_mm).mean() <= gain  # clipping pays off most at low bit widths


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_per_tensor_activation_never_worse_than_minmax(bits: int) -> None:
    x = torch.nn.functional.gelu(torch.randn(64, 256) * 2)
    mse, mm = O.AvgMSEObserver(bits=bits), O.AvgMinMaxObserver()
    mse.observe(x)
    mm.observe(x)
    err_mse = _lp_error(x, *mse.qparams(), bits, False, axis=None)
    err_mm = _lp_error(x, *mm.qparams(bits, False), bits, False, axis=None)
    assert err_mse[0] <= err_mm[0] * (1 + 1e-6)


def test_mse_close_to_brute_force_grid() -> None:
    """The references' exhaustive grid (100 range fractions x every zero point) as the optimum."""
    bits, qmin, qmax = 3, 0, 7
    x = torch.cat([torch.randn(8, 150) * 0.3, torch.rand(8, 10) * 4 - 1], dim=1)  # skewed outliers
    obs = O.MSEObserver(bits=bits, axis=0)
    obs.observe(x)
    ours = _lp_error(x, *obs.qparams(), bits, False, axis=0)
    lo = np.minimum(x.numpy().min(axis=1), 0)
    hi = np.maximum(x.numpy().max(axis=1), 0)
    best = np.full(8, np.inf)
    for i in range(1, 101):
        step = (hi - lo) * i / 100 / (qmax - qmin)
        for z in range(qmin, qmax + 1):
            scale = torch.tensor(step, dtype=torch.float32)
            best = np.minimum(best, _lp_error(x, scale, torch.full((8,), float(z)), bits, False, axis=0))
    assert np.all(ours >= best * (1 - 1e-4))  # the brute force really is the optimum of this family
    assert np.all(ours <= best * 1.05)


def test_avg_mse_is_mean_of_batch_optima() -> None:
    batches = [torch.randn(50, 3) * (i + 1) for i in range(3)]
    avg = O.AvgMSEObserver(bits=4, axis=1)
    singles = []
    for b in batches:
        avg.observe(b)
        one = O.MSEObserver(bits=4, axis=1)
        one.observe(b)
        singles.append([t.numpy() for t in one.range()])
    lo, hi = avg.range()
    np.testing.assert_allclose(lo.numpy(), np.mean([s[0] for s in singles], axis=0), rtol=1e-5)
    np.testing.assert_allclose(hi.numpy(), np.mean([s[1] for s in singles], axis=0), rtol=1e-5)
