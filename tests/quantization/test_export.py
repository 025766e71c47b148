"""Integer export: round trip, on-grid codes, requantization against torch, corruption detection."""
import numpy as np
import pytest
import torch
from torch import nn

from ahcq.quantization.export import (
    ExportError,
    decode_input,
    decode_weight,
    export_attention_probs,
    export_linear,
    verify_linear_export,
)
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


def layer_with(input_quantizer, bits=6, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8)
    weight_q = AdaRoundQuantizer(Role.WEIGHT, bits, observer="mse", name="lin.weight_quantizer")
    layer = QuantLinear.from_float(lin, input_quantizer, weight_q)
    x = torch.nn.functional.gelu(torch.randn(12, 16) * torch.linspace(0.2, 3, 16))
    for q in (input_quantizer, weight_q):
        q.set_mode(Mode.CALIBRATE)
    layer(x)
    for q in (input_quantizer, weight_q):
        q.set_mode(Mode.QUANTIZE)
    weight_q.harden()
    return layer, x


def input_quantizers():
    return {
        "uniform": LSQQuantizer(Role.INPUT, 6, name="lin.input_quantizer"),
        "cag": CAGQuantizer(Role.INPUT, 6, groups=3, name="lin.input_quantizer"),
        "hluq": HLUQuantizer(Role.INPUT, 6, name="lin.input_quantizer"),
    }


@pytest.mark.parametrize("kind", ["uniform", "cag", "hluq"])
def test_round_trip_and_on_grid(kind, tmp_path):
    q = input_quantizers()[kind]
    layer, x = layer_with(q)
    if kind == "cag":
        q.regroup(3)
    path = tmp_path / f"{kind}.npz"
    export_linear(layer, x, path)
    data = dict(np.load(path))
    assert str(data["x_kind"]) == kind and int(data["format_version"]) == 1
    assert data["x_codes"].dtype == np.int32 and data["x_codes"].shape == (12, 16)
    assert data["w_codes"].dtype == np.int32 and data["w_codes"].shape == (8, 16)
    assert data["w_codes"].min() >= 0 and data["w_codes"].max() <= 63
    assert data["x_codes"].min() >= 0 and data["x_codes"].max() <= 63
    # decoding the file reproduces the fake-quant tensors, and y_ref is the quantized layer's output
    assert np.array_equal(decode_input(data), q(x).detach().numpy())
    assert np.array_equal(decode_weight(data), layer.weight_quantizer(layer.weight).detach().numpy())
    assert np.array_equal(data["y_ref"], layer(x).detach().numpy())
    if kind == "cag":
        assert data["x_scale"].shape == (3,) and sorted(set(data["x_group"].tolist())) == [0, 1, 2]
    if kind == "uniform":
        assert data["x_scale"].shape == (1,) and not data["x_group"].any()
    verify_linear_export(data)


def torch_codes(t, scale, zero_point):
    """8-bit codes recovered from torch's own fake-quant kernel: ``round(fq(t)/s) + z``."""
    if isinstance(scale, torch.Tensor):
        fq = torch.fake_quantize_per_channel_affine(t, scale, zero_point, 0, 0, 255)
        scale, zero_point = scale[:, None], zero_point[:, None]
    else:
        fq = torch.fake_quantize_per_tensor_affine(t, scale, zero_point, 0, 255)
    return (torch.round(fq.double() / scale) + zero_point).int().numpy()


def test_uniform_codes_match_torch_quantize(tmp_path):
    q = FixedQuantizer(Role.INPUT, 8, observer="minmax", name="lin.input_quantizer")
    layer, x = layer_with(q, bits=8)
    nxt = FixedQuantizer(Role.INPUT, 8, observer="minmax", name="next.input_quantizer")
    nxt.set_mode(Mode.CALIBRATE)
    nxt(layer(x).detach())
    nxt.set_mode(Mode.QUANTIZE)
    data = export_linear(layer, x, tmp_path / "u.npz", next_quantizer=nxt)
    ref = torch_codes(x, q.scale.item(), int(q.zero_point))
    assert np.array_equal(data["x_codes"], ref)
    w = layer.weight_quantizer
    wref = torch_codes(layer.weight.detach(), w.scale, w.zero_point)
    assert np.array_equal(data["w_codes"], wref)
    oref = torch_codes(torch.from_numpy(data["y_ref"]), nxt.scale.item(), int(nxt.zero_point))
    assert np.array_equal(data["o_codes"], oref)
    assert float(data["o_scale"]) == nxt.scale.item()


def test_corrupted_codes_raise(tmp_path):
    layer, x = layer_with(LSQQuantizer(Role.INPUT, 6, name="lin.input_quantizer"))
    data = export_linear(layer, x, tmp_path / "c.npz")
    off_grid = dict(data, w_codes=data["w_codes"].copy())
    off_grid["w_codes"][0, 0] = 64
    with pytest.raises(ExportError, match="w_codes.*outside the grid"):
        verify_linear_export(off_grid)
    on_grid = dict(data, x_codes=data["x_codes"].copy())
    on_grid["x_codes"][0, 3] = 63 if on_grid["x_codes"][0, 3] < 32 else 0
    with pytest.raises(ExportError, match="y_ref does not match"):
        verify_linear_export(on_grid)
    wrong_version = dict(data, format_version=np.array(2, dtype=np.int32))
    with pytest.raises(ExportError, match="format_version"):
        verify_linear_export(wrong_version)


def test_soft_adaround_and_bad_inputs_refuse_to_export(tmp_path):
    layer, x = layer_with(LSQQuantizer(Role.INPUT, 6))
    layer.weight_quantizer.hard.fill_(False)
    with pytest.raises(RuntimeError, match="lin.weight_quantizer.*harden"):
        export_linear(layer, x, tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        export_linear(layer, x[:, :5], tmp_path / "s.npz")


def test_attention_probs_export(tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 6, 6) * 2, dim=-1)
    v = torch.randn(2, 6, 4)
    q = LNQuantizer(Role.ATTN_PROB, 4, name="attn.softmax_quantizer")
    q.set_mode(Mode.CALIBRATE)
    q(probs, value=v)
    q.set_mode(Mode.QUANTIZE)
    export_attention_probs(q, probs, tmp_path / "p.npz")
    data = dict(np.load(tmp_path / "p.npz"))
    assert str(data["kind"]) == "lnq" and data["levels"].shape == (16,)
    assert data["codes"].min() >= 0 and data["codes"].max() <= 15
    assert np.array_equal(data["levels"][data["codes"]], q(probs).detach().numpy())
    assert np.array_equal(data["p_ref"], q(probs).detach().numpy())
    alpha, clip = float(data["alpha"]), float(data["clip"])
    expected = np.expm1(np.arange(16) / 15 * np.log1p(alpha * clip)) / alpha
    assert np.allclose(data["levels"], expected, rtol=1e-5)


@pytest.mark.filterwarnings("error")
def test_learnable_parameters_export_without_autograd_warnings():
    """``export`` outside ``no_grad`` reads learnable scales as plain numbers (torch warns on ``float`` of a
    tensor that requires grad; it warns once per process unless told to warn always)."""
    probs = torch.softmax(torch.randn(2, 6, 6) * 2, dim=-1)
    quantizers = [HLUQuantizer(Role.INPUT, 6, name="hluq"), AGQuantizer(Role.ATTN_PROB, 4, name="agq")]
    torch._C._set_warnAlways(True)
    try:
        for q in quantizers:
            assert any(p.requires_grad for p in q.parameters())
            q.set_mode(Mode.CALIBRATE)
            if isinstance(q, AGQuantizer):
                q(probs, value=torch.randn(2, 6, 4))
            else:
                q(probs)
            q.set_mode(Mode.QUANTIZE)
            assert np.isfinite([float(v) for k, v in q.export().items() if k != "kind"]).all()
    finally:
        torch._C._set_warnAlways(False)
