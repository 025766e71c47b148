"""AdaRound: soft initialisation, hardening, regulariser and temperature schedule."""
import math

import pytest
import torch

from ahcq.quantization.quantizers import AdaRoundQuantizer, BetaSchedule, Mode, Role


def calibrated_adaround(w, bits=4, observer="minmax", ch_axis=0):
    q = AdaRoundQuantizer(Role.WEIGHT, bits, observer=observer, ch_axis=ch_axis, name="lin.weight_quantizer")
    q.set_mode(Mode.CALIBRATE)
    q(w)
    q.set_mode(Mode.QUANTIZE)
    return q


def weights(seed=0):
    torch.manual_seed(seed)
    return torch.randn(6, 20) * torch.linspace(0.05, 2.0, 6)[:, None]


def test_soft_initialisation_equals_float_weights():
    w = weights()
    q = calibrated_adaround(w)
    assert not q.is_hard
    scale, zp = q.scale[:, None], q.zero_point[:, None]
    # with an integer zero point the grid may end just inside [min, max]: compare where it covers w
    down = torch.floor(w / scale) + zp
    inside = (down >= 0) & (down + 1 <= 15)
    assert inside.float().mean() > 0.9
    err = (q(w).detach() - w).abs()[inside]
    assert float(err.max()) <= float(scale.max()) * 4e-6


def test_hardened_equals_fake_quant_of_round_down_plus_bit():
    w = weights(1)
    q = calibrated_adaround(w, bits=3)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 3)  # arbitrary learned state
    bit = (q.alpha.detach() >= 0).float()
    scale, zp = q.scale, q.zero_point
    target = (torch.floor(w / scale[:, None]) + bit) * scale[:, None]
    ref = torch.fake_quantize_per_channel_affine(target, scale, zp, 0, 0, 7)
    q.harden()
    assert q.is_hard
    assert torch.equal(q(w), ref)
    assert torch.equal(q.dequantize_int(q.quantize_int(w)), ref)


def test_initial_hard_rounding_is_round_to_nearest():
    w = weights(2)
    q = calibrated_adaround(w, bits=4, observer="mse")
    q.harden()
    ref = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point, 0, 0, 15)
    assert torch.equal(q(w), ref)


def test_regularizer_hand_computed():
    q = calibrated_adaround(torch.zeros(1, 4) + torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    with torch.no_grad():
        # h(0) = 0.5 -> 1; h(+50) = 1 -> 0; h(-50) = 0 -> 0; sigmoid(ln 3) = 0.75 -> h = 0.8, |2h-1| = 0.6
        q.alpha.copy_(torch.tensor([[0.0, 50.0, -50.0, math.log(3.0)]]))
    assert q.regularizer(2.0).item() == pytest.approx(1.0 + 0.0 + 0.0 + (1 - 0.36), rel=1e-6)
    assert q.regularizer(3.0).item() == pytest.approx(1.0 + (1 - 0.216), rel=1e-6)


def test_soft_gradients_reach_only_the_rounding_logits():
    w = weights(3).requires_grad_(True)
    q = calibrated_adaround(w.detach())
    q(w).sum().backward()
    assert w.grad is None or torch.count_nonzero(w.grad) == 0
    assert q.alpha.grad is not None and torch.count_nonzero(q.alpha.grad) > 0


def test_beta_schedule_values():
    s = BetaSchedule(iters=100, b_start=20, b_end=2, warm_up=0.2)
    assert [s(t) for t in (0, 19, 20, 60, 100)] == pytest.approx([20, 20, 20, 11, 2])
    assert not s.active(19) and s.active(20)
    with pytest.raises(ValueError, match="warm_up"):
        BetaSchedule(iters=10, warm_up=1.0)


def test_soft_export_and_codes_raise_and_shape_is_checked():
    w = weights(4)
    q = calibrated_adaround(w)
    with pytest.raises(RuntimeError, match="lin.weight_quantizer.*harden"):
        q.quantize_int(w)
    with pytest.raises(RuntimeError, match="harden"):
        q.export()
    with pytest.raises(ValueError, match="lin.weight_quantizer"):
        q(torch.randn(3, 3))
    fresh = AdaRoundQuantizer(Role.WEIGHT, 4)
    with pytest.raises(RuntimeError, match="not calibrated"):
        fresh.harden()


def test_logits_parameter_identity_survives_calibration():
    q = AdaRoundQuantizer(Role.WEIGHT, 4, observer="minmax")
    alpha = q.alpha
    w = weights(5)
    q.set_mode(Mode.CALIBRATE)
    q(w)
    q.set_mode(Mode.QUANTIZE)
    assert q.alpha is alpha and alpha.shape == w.shape
