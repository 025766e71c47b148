"""Layers: bit parity with the float modules when quantizers are off, shared parameters, quantized math."""
import pytest
import torch
from torch import nn

from ahcq.quantization.layers import QuantConv2d, QuantLinear, QuantMatMul
from ahcq.quantization.quantizers import FixedQuantizer, LSQQuantizer, Mode, Role


def off_quantizers(n):
    return [LSQQuantizer(Role.INPUT, 4) for _ in range(n)]


def test_linear_off_and_empty_slots_are_bit_identical():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7)
    x = torch.randn(5, 3, 13)
    for slots in (off_quantizers(3), [None, None, None]):
        q = QuantLinear.from_float(lin, *slots)
        assert torch.equal(q(x), lin(x))


@pytest.mark.parametrize("kwargs", [
    dict(stride=2, padding=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=3),
    dict(stride=(2, 1), padding=(1, 0), groups=6, bias=False),
    dict(padding=1, padding_mode="reflect"),
    dict(padding="same", dilation=2),
])
def test_conv_off_is_bit_identical(kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 12, 3, **kwargs)
    x = torch.randn(2, 6, 11, 9)
    q = QuantConv2d.from_float(conv, *off_quantizers(3))
    assert torch.equal(q(x), conv(x))
    back = q.to_float()
    assert back.weight is conv.weight and back.bias is conv.bias
    assert torch.equal(back(x), conv(x))


def test_matmul_off_is_bit_identical():
    torch.manual_seed(2)
    a, b = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 6, 3)
    assert torch.equal(QuantMatMul(*off_quantizers(2))(a, b), torch.matmul(a, b))
    assert torch.equal(QuantMatMul()(a, b), torch.matmul(a, b))


def test_from_float_and_to_float_share_parameters():
    lin = nn.Linear(4, 3)
    q = QuantLinear.from_float(lin, None, None)
    assert q.weight is lin.weight and q.bias is lin.bias
    back = q.to_float()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    x = torch.randn(2, 4)
    assert torch.equal(back(x), lin(x))
    no_bias = QuantLinear.from_float(nn.Linear(4, 3, bias=False)).to_float()
    assert no_bias.bias is None


def test_quantized_linear_and_conv_match_torch_fake_quant_composition():
    torch.manual_seed(3)
    lin = nn.Linear(8, 5)
    x = torch.randn(10, 8)
    q = QuantLinear.from_float(lin, FixedQuantizer(Role.INPUT, 8, observer="minmax"),
                               FixedQuantizer(Role.WEIGHT, 8, ch_axis=0, observer="minmax"),
                               FixedQuantizer(Role.OUTPUT, 8, observer="minmax"))
    for m in (q.input_quantizer, q.weight_quantizer, q.output_quantizer):
        m.set_mode(Mode.CALIBRATE)
    q(x)
    for m in (q.input_quantizer, q.weight_quantizer, q.output_quantizer):
        m.set_mode(Mode.QUANTIZE)
    iq, wq, oq = q.input_quantizer, q.weight_quantizer, q.output_quantizer
    xq = torch.fake_quantize_per_tensor_affine(x, iq.scale.item(), int(iq.zero_point), 0, 255)
    wqt = torch.fake_quantize_per_channel_affine(lin.weight, wq.scale.detach(), wq.zero_point, 0, 0, 255)
    y = torch.fake_quantize_per_tensor_affine(nn.functional.linear(xq, wqt, lin.bias), oq.scale.item(),
                                              int(oq.zero_point), 0, 255)
    assert torch.equal(q(x), y)

    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
    qc = QuantConv2d.from_float(conv, FixedQuantizer(Role.INPUT, 6, observer="minmax"),
                                FixedQuantizer(Role.WEIGHT, 6, ch_axis=0, observer="minmax"))
    xc = torch.randn(2, 3, 8, 8)
    qc.input_quantizer.set_mode(Mode.CALIBRATE)
    qc.weight_quantizer.set_mode(Mode.CALIBRATE)
    qc(xc)
    qc.input_quantizer.set_mode(Mode.QUANTIZE)
    qc.weight_quantizer.set_mode(Mode.QUANTIZE)
    iq, wq = qc.input_quantizer, qc.weight_quantizer
    xq = torch.fake_quantize_per_tensor_affine(xc, iq.scale.item(), int(iq.zero_point), 0, 63)
    wqt = torch.fake_quantize_per_channel_affine(conv.weight, wq.scale.detach(), wq.zero_point, 0, 0, 63)
    assert torch.equal(qc(xc), nn.functional.conv2d(xq, wqt, conv.bias, 2, 1))


def test_slots_must_be_quantizers():
    with pytest.raises(TypeError, match="input_quantizer"):
        QuantLinear.from_float(nn.Linear(2, 2), nn.Identity())
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(2, 2))
