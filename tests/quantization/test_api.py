"""api: layer swapping, naming, overrides, mode context managers and the evaluation-state assertion."""
import dataclasses

import pytest
import torch
from torch import nn

from ahcq.quantization import api
from ahcq.quantization.api import NotFullyQuantizedError, QuantSpec
from ahcq.quantization.granularity import ChannelGroups, PerChannel, PerTensor
from ahcq.quantization.layers import QuantConv2d, QuantLinear
from ahcq.quantization.quantizers import (
    QUANTIZERS,
    AdaRoundQuantizer,
    CAGQuantizer,
    HLUQuantizer,
    LSQQuantizer,
    Mode,
    Role,
)

ACT = QuantSpec(quantizer="lsq", observer="avg_minmax", bits=8)
WEIGHT = QuantSpec(quantizer="adaround", observer="mse", bits=8, granularity=PerChannel(0))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        h = self.body(torch.relu(self.stem(x))).mean(dim=(2, 3))
        return self.head(h)


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


def quantized_net(**kwargs):
    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    return api.quantize(net, ACT, WEIGHT, **kwargs), ref


def calibrate(net, batches):
    with api.calibrating(net):
        for x in batches:
            net(x)
    api.set_mode(net, Mode.QUANTIZE)


def harden(net):
    for _, q in api.iter_quantizers(net):
        if isinstance(q, AdaRoundQuantizer):
            q.harden()


def test_w8a8_is_close_to_float_and_fully_quantized():
    net, ref = quantized_net()
    batches = data()
    calibrate(net, batches)
    harden(net)
    api.assert_fully_quantized(net)
    with torch.no_grad():
        for x in batches:
            y, y_ref = net(x), ref(x)
            assert ((y - y_ref).norm() / y_ref.norm()).item() < 0.02
            assert not torch.equal(y, y_ref)


def test_every_layer_is_swapped_and_every_quantizer_named_by_path_and_slot():
    net, _ = quantized_net()
    assert isinstance(net.stem, QuantConv2d) and isinstance(net.body[0], QuantConv2d)
    assert isinstance(net.head[0], QuantLinear) and isinstance(net.head[2], QuantLinear)
    names = {path: q for path, q in api.iter_quantizers(net)}
    assert len(names) == 8
    for path, q in names.items():
        assert q.name == path
        assert q.role is (Role.WEIGHT if path.endswith("weight_quantizer") else Role.INPUT)


def test_quantization_disabled_is_bit_identical_to_float():
    net, ref = quantized_net()
    calibrate(net, data(2))
    x = data(1, seed=5)[0]
    with api.quantization_disabled(net):
        assert torch.equal(net(x), ref(x))
    assert all(q.mode is Mode.QUANTIZE for _, q in api.iter_quantizers(net))


def test_skip_and_overrides():
    net, _ = quantized_net(
        skip=["stem"],
        overrides=[
            ("head.*", {"bits": 6}),
            ("re:head\\.2", {"act": {"quantizer": "hluq"}, "output": {}}),
            ("body.0", None),
            ("head.0", {"act": {"quantizer": "cag", "granularity": ChannelGroups(2)}, "weight": None}),
        ],
    )
    assert type(net.stem) is nn.Conv2d and type(net.body[0]) is nn.Conv2d
    lin1, lin2 = net.head[0], net.head[2]
    assert isinstance(lin1.input_quantizer, CAGQuantizer) and lin1.input_quantizer.bits == 6
    assert lin1.weight_quantizer is None
    assert isinstance(lin2.input_quantizer, HLUQuantizer) and lin2.input_quantizer.bits == 6
    assert lin2.weight_quantizer.bits == 6 and isinstance(lin2.output_quantizer, LSQQuantizer)
    assert lin2.output_quantizer.role is Role.OUTPUT and lin2.output_quantizer.bits == 6
    with pytest.raises(ValueError, match="override 'head.0'.*'bitz'"):
        api.quantize(Net(), ACT, WEIGHT, overrides=[("head.0", {"bitz": 4})])
    with pytest.raises(ValueError, match="unknown quantizer"):
        QuantSpec(quantizer="nope")


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_every_family_is_built_with_the_granularity_and_options_its_spec_names(kind):
    """The spec's granularity type is what the built quantizer reports (a per-tensor AdaRound must not
    fall back on the constructor's default axis 0), and its options reach the quantizer."""
    family = QUANTIZERS[kind]
    cases = {PerTensor: [PerTensor()], PerChannel: [PerChannel(0), PerChannel(1)],
             ChannelGroups: [ChannelGroups(3), ChannelGroups(None)]}
    for granularity in (g for t in family.granularities for g in cases[t]):
        q = api.build_quantizer(QuantSpec(quantizer=kind, bits=4, granularity=granularity), Role.INPUT, "q")
        assert type(q) is family and q.granularity == granularity
    others = [g for t, gs in cases.items() if t not in family.granularities for g in gs]
    for granularity in others:
        with pytest.raises(ValueError, match=f"'{kind}' is "):
            QuantSpec(quantizer=kind, granularity=granularity)
    if family.options is None:
        return
    fields = dataclasses.fields(family.options)
    default = family.options()
    changed = dataclasses.replace(default, **{fields[0].name: _another(getattr(default, fields[0].name))})
    spec = QuantSpec(quantizer=kind, bits=4, granularity=cases[family.granularities[0]][0], options=changed)
    q = api.build_quantizer(spec, Role.INPUT, "q")
    assert getattr(q, fields[0].name) == getattr(changed, fields[0].name) != getattr(default, fields[0].name)
    with pytest.raises(ValueError, match="takes"):
        QuantSpec(quantizer="lsq", options=changed)


def _another(value):
    """A valid value of an option field different from ``value``."""
    if isinstance(value, tuple):
        return value[:1]
    return value + 1 if isinstance(value, int) else value


def test_bare_linear_is_returned_quantized():
    lin = nn.Linear(3, 3)
    q = api.quantize(lin, ACT, WEIGHT)
    assert isinstance(q, QuantLinear) and q.weight is lin.weight
    assert q.input_quantizer.name == "input_quantizer"


def test_assert_fully_quantized_names_offenders():
    net, _ = quantized_net()
    with pytest.raises(NotFullyQuantizedError, match="stem.input_quantizer: mode is OFF"):
        api.assert_fully_quantized(net)
    calibrate(net, data(2))
    with pytest.raises(NotFullyQuantizedError, match="head.2.weight_quantizer: AdaRound rounding is still"):
        api.assert_fully_quantized(net)
    harden(net)
    api.assert_fully_quantized(net)
    with api.dropping(net, 0.5, torch.Generator().manual_seed(0)):
        with pytest.raises(NotFullyQuantizedError, match="head.0.input_quantizer: mode is DROP") as info:
            api.assert_fully_quantized(net)
        assert isinstance(info.value, AssertionError)
        assert all(not name.endswith("weight_quantizer") for name, _ in info.value.offenders)
    api.assert_fully_quantized(net)
    with pytest.raises(NotFullyQuantizedError, match="no quantizers"):
        api.assert_fully_quantized(nn.Linear(2, 2))


def test_dropping_is_reproducible_and_restores_modes():
    net, _ = quantized_net()
    calibrate(net, data(2))
    harden(net)
    x = data(1, seed=3)[0]
    quantized = net(x)
    with api.dropping(net, 0.5, torch.Generator().manual_seed(1)):
        first = net(x)
    with api.dropping(net, 0.5, torch.Generator().manual_seed(1)):
        assert torch.equal(net(x), first)
    assert not torch.equal(first, quantized)
    assert torch.equal(net(x), quantized)


def test_calibrating_restores_previous_modes_and_aborts_on_error():
    net, _ = quantized_net()
    with pytest.raises(RuntimeError, match="boom"):
        with api.calibrating(net):
            raise RuntimeError("boom")
    assert all(q.mode is Mode.OFF and not bool(q.calibrated) for _, q in api.iter_quantizers(net))
    calibrate(net, data(1))
    with api.calibrating(net):
        net(data(1, seed=9)[0])
    assert all(q.mode is Mode.QUANTIZE for _, q in api.iter_quantizers(net))


def test_nan_input_raises_naming_the_quantizer():
    net, _ = quantized_net()
    calibrate(net, data(1))
    x = data(1)[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="stem.input_quantizer"):
        net(x)


def test_calibration_names_quantizers_that_saw_no_data():
    net, _ = quantized_net()
    with pytest.raises(RuntimeError, match="4 quantizer.*head.0.input_quantizer"):
        with api.calibrating(net):
            net.stem(data(1)[0])
            net.body(torch.randn(2, 8, 5, 5))
    assert all(not bool(q.calibrated) for _, q in api.iter_quantizers(net))
