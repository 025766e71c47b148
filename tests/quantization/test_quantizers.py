"""Base quantizer behaviour (modes, QDrop, errors, state) and the uniform LSQ / fixed quantizers."""
import math

import pytest
import torch

from ahcq.quantization.quantizers import (
    QUANTIZERS,
    FixedQuantizer,
    LSQQuantizer,
    Mode,
    Role,
    make_quantizer,
)


def calibrated(q, *batches):
    q.set_mode(Mode.CALIBRATE)
    for b in batches:
        assert q(b) is b
    q.set_mode(Mode.QUANTIZE)
    return q


def minmax_qparams(lo, hi, bits):
    """Asymmetric grid by hand (float64), as in the reference formula."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    return scale, int(min(max(-round(lo / scale), 0), qmax))


def test_fixed_per_tensor_matches_torch_fake_quant():
    torch.manual_seed(0)
    x = torch.randn(4, 33) * 3 + 0.5
    q = calibrated(FixedQuantizer(Role.INPUT, 6, observer="minmax"), x)
    scale, zp = minmax_qparams(x.min(), x.max(), 6)
    assert float(q.scale) == pytest.approx(scale, rel=1e-6)
    assert int(q.zero_point) == zp
    ref = torch.fake_quantize_per_tensor_affine(x, float(q.scale), zp, 0, 63)
    assert torch.equal(q(x), ref)


def test_fixed_per_channel_matches_torch_fake_quant_and_int_roundtrip():
    torch.manual_seed(1)
    w = torch.randn(8, 5) * torch.linspace(0.1, 4, 8)[:, None]
    q = calibrated(FixedQuantizer(Role.WEIGHT, 4, ch_axis=0, observer="minmax"), w)
    for c in range(8):
        scale, zp = minmax_qparams(w[c].min(), w[c].max(), 4)
        assert float(q.scale[c]) == pytest.approx(scale, rel=1e-6)
        assert int(q.zero_point[c]) == zp
    ref = torch.fake_quantize_per_channel_affine(w, q.scale.detach(), q.zero_point, 0, 0, 15)
    assert torch.equal(q(w), ref)
    codes = q.quantize_int(w)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(q.dequantize_int(codes), ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_per_tensor_gradients_match_torch_learnable_op(bits):
    torch.manual_seed(2)
    x = torch.randn(3, 7, 11) * 2
    q = calibrated(LSQQuantizer(Role.INPUT, bits, observer="minmax"), x)
    with torch.no_grad():
        q.scale.mul_(0.7)  # some values clip: both gradient branches are exercised
    xa = x.clone().requires_grad_(True)
    upstream = torch.randn_like(x)
    (q(xa) * upstream).sum().backward()

    qmax = 2**bits - 1
    xb = x.clone().requires_grad_(True)
    scale = q.scale.detach().clone().reshape(1).requires_grad_(True)
    zp = q.zero_point.float().reshape(1)
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, scale, zp, 0, qmax, factor)
    (ref * upstream).sum().backward()
    assert torch.equal(q(x), ref.detach())
    assert torch.allclose(xa.grad, xb.grad)
    assert q.scale.grad.item() == pytest.approx(scale.grad.item(), rel=1e-4, abs=1e-7)


def test_lsq_per_channel_gradients_match_torch_learnable_op():
    torch.manual_seed(3)
    x = torch.randn(6, 9, 5) * torch.linspace(0.5, 3, 5)
    q = calibrated(LSQQuantizer(Role.INPUT, 5, ch_axis=2, observer="minmax"), x)
    with torch.no_grad():
        q.scale.mul_(0.8)
    xa = x.clone().requires_grad_(True)
    upstream = torch.randn_like(x)
    (q(xa) * upstream).sum().backward()

    qmax = 31
    scale = q.scale.detach().clone().requires_grad_(True)
    factor = 1.0 / math.sqrt(x.numel() / 5 * qmax)
    zp = q.zero_point.float()
    ref = torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, 2, 0, qmax, factor)
    (ref * upstream).sum().backward()
    assert torch.equal(q(x), ref.detach())
    assert torch.allclose(q.scale.grad, scale.grad, rtol=1e-4, atol=1e-7)


def test_drop_mode_mixes_per_element_reproducibly():
    torch.manual_seed(4)
    x = torch.randn(200, 50)
    q = calibrated(LSQQuantizer(Role.INPUT, 3, observer="minmax"), x)
    xq = q(x)
    assert not torch.equal(xq, x)

    q.set_mode(Mode.DROP, drop_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q(x), xq)
    q.set_mode(Mode.DROP, drop_p=1.0)
    assert torch.equal(q(x), x)

    differs = xq != x
    q.set_mode(Mode.DROP, drop_p=0.5, generator=torch.Generator().manual_seed(7))
    first = q(x)
    kept_float = (first == x) & differs
    fraction = kept_float.sum().item() / differs.sum().item()
    assert abs(fraction - 0.5) < 0.02
    assert torch.equal(first[~kept_float], xq[~kept_float])
    q.set_mode(Mode.DROP, drop_p=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(q(x), first)


def test_nan_and_inf_raise_naming_the_quantizer():
    q = LSQQuantizer(Role.INPUT, 8, name="blocks.0.mlp.lin1.input_quantizer")
    bad = torch.tensor([0.0, float("nan")])
    q.set_mode(Mode.CALIBRATE)
    with pytest.raises(ValueError, match="blocks.0.mlp.lin1.input_quantizer"):
        q(bad)
    q(torch.tensor([1.0, -1.0]))
    q.set_mode(Mode.QUANTIZE)
    with pytest.raises(ValueError, match="blocks.0.mlp.lin1.input_quantizer"):
        q(torch.tensor([float("inf")]))


def test_quantize_before_calibration_and_empty_calibration_raise():
    q = LSQQuantizer(Role.INPUT, 8, name="lin.input_quantizer")
    with pytest.raises(RuntimeError, match="lin.input_quantizer.*not calibrated"):
        q.set_mode(Mode.QUANTIZE)
    q.set_mode(Mode.CALIBRATE)
    with pytest.raises(RuntimeError, match="lin.input_quantizer.*no data"):
        q.set_mode(Mode.OFF)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(Role.INPUT, 9)
    with pytest.raises(TypeError, match="role"):
        LSQQuantizer("input", 8)
    with pytest.raises(ValueError, match="unknown quantizer 'lsqq'"):
        make_quantizer("lsqq", Role.INPUT, 8)
    q = calibrated(LSQQuantizer(Role.INPUT, 8, ch_axis=1, observer="minmax", name="q"), torch.randn(2, 4))
    with pytest.raises(ValueError, match="'q'.*4 channels"):
        q(torch.randn(2, 5))
    with pytest.raises(ValueError, match="drop_p"):
        q.set_mode(Mode.DROP, drop_p=1.5)


def test_scale_parameter_identity_survives_calibration_for_optimizers():
    q = LSQQuantizer(Role.INPUT, 4, ch_axis=-1, observer="avg_minmax")
    scale = q.scale
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    x = torch.randn(10, 6)
    calibrated(q, x, x * 2)
    assert q.scale is scale and q.scale.shape == (6,)
    before = q.scale.detach().clone()
    (q(x) - x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(q.scale.detach(), before)


def test_state_dict_roundtrip_resizes_per_channel_parameters():
    x = torch.randn(16, 3, 5)
    q = calibrated(LSQQuantizer(Role.INPUT, 6, ch_axis=1, observer="minmax"), x)
    fresh = LSQQuantizer(Role.INPUT, 6, ch_axis=1, observer="minmax")
    fresh.load_state_dict(q.state_dict())
    fresh.set_mode(Mode.QUANTIZE)
    assert torch.equal(fresh(x), q(x))


def test_weight_quantizer_observes_first_batch_only():
    w = torch.randn(4, 4)
    q = FixedQuantizer(Role.WEIGHT, 8, observer="minmax")
    calibrated(q, w, w * 100)
    scale, _ = minmax_qparams(w.min(), w.max(), 8)
    assert float(q.scale) == pytest.approx(scale, rel=1e-6)


def test_registry_has_every_family():
    assert set(QUANTIZERS) == {"lsq", "fixed", "adaround", "hluq", "lnq", "agq", "cag"}
    for name, cls in QUANTIZERS.items():
        assert cls.family == name


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_every_family_survives_a_state_dict_round_trip(kind):
    torch.manual_seed(5)
    role = Role.WEIGHT if kind == "adaround" else Role.ATTN_PROB if kind in ("lnq", "agq") else Role.INPUT
    x = torch.softmax(torch.randn(4, 6, 12), dim=-1) if role is Role.ATTN_PROB else torch.randn(12, 16)
    q = calibrated(make_quantizer(kind, role, 4), x)
    if kind == "cag":
        q.regroup(3)
    if kind == "adaround":
        q.harden()
    fresh = make_quantizer(kind, role, 4)
    fresh.load_state_dict(q.state_dict())
    fresh.set_mode(Mode.QUANTIZE)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.quantize_int(x), q.quantize_int(x))
