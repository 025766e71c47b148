"""CAG: grouping quality, partition, parameter identity, group parameters by hand."""
import pytest
import torch

from ahcq.quantization.api import QuantSpec
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.quantizers import CAGQuantizer, LSQQuantizer, Mode, Role, progressive_schedule


def channel_varying(seed=0, channels=48):
    """Channels in a few families of very different ranges, so a handful of groups fits well."""
    torch.manual_seed(seed)
    spread = torch.tensor([0.05, 0.3, 1.0, 4.0])[torch.arange(channels) % 4]
    offset = torch.tensor([0.0, 0.5, -1.0, 2.0])[torch.arange(channels) % 4]
    spread = spread * (1 + 0.1 * torch.rand(channels))
    return [torch.randn(64, channels) * spread + offset for _ in range(3)]


def calibrate(q, batches):
    q.set_mode(Mode.CALIBRATE)
    for x in batches:
        q(x)
    q.set_mode(Mode.QUANTIZE)
    return q


def mse(q, batches):
    with torch.no_grad():
        return sum(((q(x) - x) ** 2).mean().item() for x in batches)


def test_four_groups_lie_between_per_tensor_and_per_channel():
    batches = channel_varying()
    per_tensor = calibrate(LSQQuantizer(Role.INPUT, 4), batches)
    per_channel = calibrate(LSQQuantizer(Role.INPUT, 4, ch_axis=-1), batches)
    cag = calibrate(CAGQuantizer(Role.INPUT, 4, groups=4), batches)
    assert mse(cag, batches) == pytest.approx(mse(per_channel, batches), rel=1e-6)  # starts per channel
    cag.regroup(4)
    err_t, err_g, err_c = mse(per_tensor, batches), mse(cag, batches), mse(per_channel, batches)
    assert err_c < err_g < err_t
    assert err_g < 0.5 * err_t


def test_group_index_partitions_channels():
    batches = channel_varying(1)
    q = calibrate(CAGQuantizer(Role.INPUT, 4), batches)
    for k in progressive_schedule(4):
        q.regroup(k)
        index = q.group_index
        assert index.shape == (48,) and index.dtype == torch.int64
        assert int(q.groups) == k
        assert torch.equal(torch.unique(index), torch.arange(k))
        exported = q.export()
        assert exported["scale"].shape == (k,) and exported["zero_point"].shape == (k,)
        assert (exported["group_index"] == index.numpy()).all()


def test_group_parameters_are_the_mean_member_ranges():
    batches = channel_varying(2)
    q = calibrate(CAGQuantizer(Role.INPUT, 6, observer="avg_minmax", group_range="mean"), batches)
    scale_c = q.scale.detach().clone()
    zp_c = q.zero_point.clone()
    q.regroup(5)
    for g in range(5):
        members = q.group_index == g
        assert q.scale[g].item() == pytest.approx(scale_c[members].mean().item(), rel=1e-5)
        lo = (scale_c[members] * (0 - zp_c[members].float())).mean()
        expected_zp = min(max(round(-lo.item() / q.scale[g].item()), 0), 63)
        assert int(q.zero_point[g]) == expected_zp
    x = batches[0]
    s = q.scale.detach()[q.group_index]
    z = q.zero_point[q.group_index]
    assert torch.equal(q(x), torch.fake_quantize_per_channel_affine(x, s, z, 1, 0, 63))


def test_envelope_groups_cover_every_member_range():
    """The envelope group range, re-derived in float64: no member is clipped."""
    batches = channel_varying(2)
    q = calibrate(CAGQuantizer(Role.INPUT, 6, observer="avg_minmax", group_range="envelope"), batches)
    lo_c = (q.scale.detach() * (0 - q.zero_point.float())).double()
    hi_c = (q.scale.detach() * (63 - q.zero_point.float())).double()
    q.regroup(5)
    for g in range(5):
        members = q.group_index == g
        lo, hi = min(lo_c[members].min().item(), 0.0), max(hi_c[members].max().item(), 0.0)
        assert q.scale[g].item() == pytest.approx((hi - lo) / 63, rel=1e-5)
        assert int(q.zero_point[g]) == min(max(round(-lo / ((hi - lo) / 63)), 0), 63)
    s_c = q.scale.detach()[q.group_index].double()  # each channel's group grid holds its calibrated range
    z_c = q.zero_point[q.group_index].double()
    assert (s_c * (0 - z_c) <= lo_c + s_c / 2 + 1e-6).all()
    assert (s_c * (63 - z_c) >= hi_c - s_c / 2 - 1e-6).all()
    with pytest.raises(ValueError, match="group_range"):
        CAGQuantizer(Role.INPUT, 4, group_range="median")


def _group_error(values: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Float64 mean squared error on ``values`` of the asymmetric grid over ``[lo, hi]`` (widened to 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zp = min(max(round(-lo / scale), 0), 2**bits - 1)
    v = values.double()
    q = (torch.clamp(torch.round(v / scale) + zp, 0, 2**bits - 1) - zp) * scale
    return float(((q - v) ** 2).mean())


def test_searched_group_range_beats_the_rules_and_a_float64_grid_search():
    """The default group range minimises each group's squared error on its members' values: never worse
    than the envelope or the mean rule, and within 2 % of a float64 brute force over a 60 x 60 grid of
    (lo, hi) windows inside the group's min-max."""
    torch.manual_seed(5)
    heavy = [torch.randn(256, 24) * torch.linspace(0.3, 3, 24) * torch.exp(torch.randn(256, 24) * 0.4)
             for _ in range(2)]
    x = torch.cat(heavy)
    errors = {}
    for rule in ("search", "envelope", "mean"):
        q = calibrate(CAGQuantizer(Role.INPUT, 4, groups=3, group_range=rule), heavy)
        q.regroup(3)
        errors[rule] = float(((q(x).detach() - x).double() ** 2).mean())
        if rule == "search":
            index = q.group_index.clone()
            for g in range(3):
                v = x[:, index == g].flatten()
                s, z = float(q.scale.detach()[g]), int(q.zero_point[g])
                mine = _group_error(v, -z * s, (15 - z) * s, 4)
                lo, hi = float(v.min()), float(v.max())
                best = min(_group_error(v, lo * a / 60, hi * b / 60, 4)
                           for a in range(1, 61) for b in range(1, 61))
                assert mine <= best * 1.02
    assert errors["search"] <= errors["envelope"] and errors["search"] <= errors["mean"]
    with pytest.raises(RuntimeError, match="calibrat"):
        CAGQuantizer(Role.INPUT, 4).regroup(2)


def test_regroup_keeps_parameter_identity_and_optimizer_works():
    batches = channel_varying(3)
    q = CAGQuantizer(Role.INPUT, 4)
    scale = q.scale
    calibrate(q, batches)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for k in (16, 4):
        q.regroup(k)
        assert q.scale is scale
        opt.zero_grad()
        (q(batches[0]) - batches[0]).pow(2).mean().backward()
        assert torch.count_nonzero(scale.grad[k:]) == 0 and torch.count_nonzero(scale.grad[:k]) > 0
        opt.step()


def test_regroup_is_deterministic_and_validates():
    batches = channel_varying(4)
    a = calibrate(CAGQuantizer(Role.INPUT, 4, name="enc.lin1.input_quantizer"), batches)
    b = calibrate(CAGQuantizer(Role.INPUT, 4), batches)
    a.regroup(8)
    b.regroup(8)
    assert torch.equal(a.group_index, b.group_index)
    with pytest.raises(ValueError, match="enc.lin1.input_quantizer.*regroup"):
        a.regroup(49)
    with pytest.raises(ValueError, match="'cag' is ChannelGroups, got PerChannel"):
        QuantSpec(quantizer="cag", granularity=PerChannel(0))
    assert progressive_schedule(4) == [32, 16, 8, 4]
    with pytest.raises(ValueError):
        progressive_schedule(0)
    with pytest.raises(RuntimeError, match="not calibrated"):
        CAGQuantizer(Role.INPUT, 4).regroup(2)


@pytest.mark.parametrize("channels, target", [(48, 4), (20, 4), (3, 1)])
def test_merge_to_target_follows_the_progressive_schedule(channels, target):
    """Runs without reconstruction merge to G groups by the same rounds reconstruction uses (capped at the
    channel count), and a merged quantizer is left alone."""
    batches = channel_varying(3, channels)
    merged = calibrate(CAGQuantizer(Role.INPUT, 4, groups=target), batches)
    by_hand = calibrate(CAGQuantizer(Role.INPUT, 4, groups=target), batches)
    merged.merge_to_target()
    for k in progressive_schedule(target):
        if k < int(by_hand.groups):
            by_hand.regroup(k)
    assert int(merged.groups) == target
    assert torch.equal(merged.group_index, by_hand.group_index)
    assert torch.equal(merged.scale, by_hand.scale) and torch.equal(merged.zero_point, by_hand.zero_point)
    before = merged.scale.detach().clone()
    merged.merge_to_target()
    assert torch.equal(merged.scale, before)
    per_channel = calibrate(CAGQuantizer(Role.INPUT, 4, groups=None), batches)
    per_channel.merge_to_target()
    assert int(per_channel.groups) == channels
