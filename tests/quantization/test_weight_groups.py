"""CAG on weights: grouped per-channel weight grids against a float64 re-derivation, AdaRound starting from
the float weights on the grouped grid, and the integer export of a grouped layer."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ahcq.quantization.export import export_linear
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import (
    AdaRoundQuantizer,
    CAGQuantizer,
    FixedQuantizer,
    Mode,
    Quantizer,
    Role,
)
from ahcq.quantization.quantizers.weight_groups import group_weight_grid


def calibrated(q: Quantizer, w: torch.Tensor) -> Quantizer:
    q.set_mode(Mode.CALIBRATE)
    q(w)
    q.set_mode(Mode.QUANTIZE)
    return q


def grids(q: Quantizer) -> set[tuple[float, int]]:
    return set(zip(q.scale.detach().tolist(), q.zero_point.tolist()))


def test_two_separated_ranges_make_the_expected_groups():
    # rows 0 and 2 span about [-0.1, 0.2], rows 1 and 3 about [-2, 3]; 4-bit asymmetric min-max grids
    ends = torch.tensor([[-0.10, 0.20], [-2.0, 3.0], [-0.12, 0.18], [-1.8, 3.3]], dtype=torch.float64)
    w = torch.stack([torch.linspace(float(lo), float(hi), 8) for lo, hi in ends]).float()
    q = calibrated(FixedQuantizer(Role.WEIGHT, 4, ch_axis=0, observer="minmax", name="w"), w)
    own_scale = (ends[:, 1] - ends[:, 0]) / 15
    assert torch.allclose(q.scale.detach().double(), own_scale, rtol=1e-6)
    assert group_weight_grid(q, w, 2) == 2
    scale, zp = q.scale.detach().double(), q.zero_point
    assert scale[0] == scale[2] and scale[1] == scale[3] and scale[0] != scale[1]
    assert zp[0] == zp[2] and zp[1] == zp[3]
    own_zp = torch.round(-ends[:, 0] / own_scale)
    for members in ([0, 2], [1, 3]):
        s = own_scale[members]
        lo = (s * -own_zp[members]).mean()
        assert scale[members[0]].item() == pytest.approx(s.mean().item(), rel=1e-6)
        assert int(zp[members[0]]) == min(max(round(-lo.item() / s.mean().item()), 0), 15)
    assert torch.equal(q(w), torch.fake_quantize_per_channel_affine(w, q.scale.detach(), zp, 0, 0, 15))


@pytest.mark.parametrize("k", [1, 5, 24, 40])
def test_adaround_gets_min_k_channels_grids_each_the_mean_of_its_members(k):
    torch.manual_seed(0)
    w = torch.randn(24, 16) * torch.linspace(0.05, 2.0, 24)[:, None] + torch.linspace(-0.5, 0.5, 24)[:, None]
    q = calibrated(AdaRoundQuantizer(Role.WEIGHT, 4, observer="mse", name="w"), w)
    before_scale, before_zp = q.scale.clone().double(), q.zero_point.clone()
    assert group_weight_grid(q, w, k, seed=3) == min(k, 24)
    assert len(grids(q)) == min(k, 24)
    for s_g, z_g in grids(q):
        members = (q.scale == s_g) & (q.zero_point == z_g)
        lo = (before_scale[members] * -before_zp[members].double()).mean()
        assert s_g == pytest.approx(before_scale[members].mean().item(), rel=1e-5)
        assert z_g == min(max(round(-lo.item() / s_g), 0), 15)
    # the rounding restarts on the grouped grid: inside the grid the soft weights are the float weights
    scale, zp = q.scale[:, None], q.zero_point[:, None].float()
    inside = (torch.floor(w / scale) + zp >= 0) & (torch.floor(w / scale) + 1 + zp <= 15)
    assert not q.is_hard and inside.float().mean() > 0.5
    torch.testing.assert_close(q(w)[inside], w[inside], atol=1e-5, rtol=0)


def test_duplicate_channels_cap_the_groups_without_a_kmeans_warning():
    w = torch.cat([torch.ones(3, 8), -torch.ones(3, 8)]) * torch.linspace(0.1, 1.0, 8)
    q = calibrated(FixedQuantizer(Role.WEIGHT, 8, ch_axis=0, observer="minmax", name="w"), w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert group_weight_grid(q, w, 4) == 2
    assert len(grids(q)) == 2


def test_grids_that_cannot_be_grouped_are_refused():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="per-tensor"):
        group_weight_grid(calibrated(FixedQuantizer(Role.WEIGHT, 4, name="t"), w), w, 2)
    with pytest.raises(TypeError, match="'cag'"):
        group_weight_grid(calibrated(CAGQuantizer(Role.WEIGHT, 4, name="c"), w), w, 2)
    with pytest.raises(RuntimeError, match="not calibrated"):
        group_weight_grid(FixedQuantizer(Role.WEIGHT, 4, ch_axis=0, name="u"), w, 2)


def test_grouped_adaround_layer_exports_and_verifies(tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(16, 12)
    layer = QuantLinear.from_float(lin, FixedQuantizer(Role.INPUT, 8, name="x"),
                                   AdaRoundQuantizer(Role.WEIGHT, 4, observer="mse", name="w"))
    x = torch.randn(5, 16)
    for q in (layer.input_quantizer, layer.weight_quantizer):
        q.set_mode(Mode.CALIBRATE)
    layer(x)
    for q in (layer.input_quantizer, layer.weight_quantizer):
        q.set_mode(Mode.QUANTIZE)
    group_weight_grid(layer.weight_quantizer, layer.weight, 3)
    layer.weight_quantizer.harden()
    data = export_linear(layer, x, tmp_path / "lin.npz")
    assert data["w_scale"].shape == (12,)
    assert len(set(zip(data["w_scale"].tolist(), data["w_zero_point"].tolist()))) == 3
