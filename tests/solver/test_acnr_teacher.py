"""After ACNR, every float target is the model as it was before ACNR (the AHCQ-SAM code's ``fp_model``).

A SAM-B-shaped ``attn.qkv`` layer (768 -> 2304) with condition number 1000 is conditioned in place; the
reconstruction engine's float capture must still see the original layer's outputs, and reconstructing
against them must bring the quantized layer closer to the original float layer than reconstructing against
the conditioned weights (the behaviour before the fix, emulated by forgetting the float reference).
"""
from __future__ import annotations

import torch
from torch import nn

from ahcq.quantization import api
from ahcq.quantization.config import ACNRConfig
from ahcq.quantization.granularity import PerChannel
from ahcq.solver.calibration import condition_linears
from ahcq.solver.recon import ReconSettings, ReconUnit, reconstruct
from ahcq.solver.recon.cache import ActivationCache, CacheKey, Entry, ItemPlan
from ahcq.solver.recon.capture import capture

IN, OUT, TOKENS = 768, 2304, 96


def _layer_and_data(seed: int = 0) -> tuple[nn.Sequential, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(OUT, IN, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(IN, IN, generator=generator))
    model = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(torch.logspace(0, -3, IN)) @ v.T * 3)
    scale = torch.logspace(-1, 0.5, IN)
    xs = [torch.randn(TOKENS, IN, generator=generator) * scale for _ in range(3)]
    return model, xs


def _quantized(model: nn.Sequential, xs: list[torch.Tensor]) -> nn.Sequential:
    api.quantize(model, act=api.QuantSpec(bits=4, quantizer="lsq", observer="avg_minmax"),
                 weight=api.QuantSpec(bits=4, quantizer="adaround", observer="mse",
                                      granularity=PerChannel(0)))
    with api.calibrating(model), torch.no_grad():
        for x in xs:
            model(x)
    return model


def _conditioned(seed: int = 0) -> tuple[nn.Sequential, list[torch.Tensor], torch.Tensor]:
    model, xs = _layer_and_data(seed)
    original = model[0].weight.detach().clone()
    _quantized(model, xs)
    report = condition_linears(model, xs, model, ACNRConfig(enabled=True, iters=200, calib=3))
    assert report["0"]["cond_before"] > 100 and report["0"]["cond_after"] < report["0"]["cond_before"] / 5
    assert not torch.equal(model[0].weight.detach(), original)
    return model, xs, original


def test_capture_targets_are_the_outputs_before_acnr() -> None:
    model, xs, original = _conditioned()
    unit = ReconUnit("0", model[0])
    with ActivationCache(2**30) as cache:
        index = capture(model, [unit], xs, lambda m, x: m(x), cache, ItemPlan(0), progress=False)
        for s, x in enumerate(xs):
            (target,) = cache.get(CacheKey(Entry.FLOAT_OUT, 0, s, 0))
            expected = x @ original.T + model[0].bias.detach()
            torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-5)
            assert not torch.allclose(target, model[0].to_float()(x), atol=1e-2)
        assert index.entries(0) == [(0, 0), (1, 0), (2, 0)]


def _reconstructed_error(forget_reference: bool) -> float:
    model, xs, original = _conditioned()
    if forget_reference:
        model[0].float_weight = None  # targets from the conditioned weights, as before the fix
    settings = ReconSettings(iters=200, weight_lr=1e-2, scale_lr=1e-3, drop_prob=1.0, seed=0)
    reconstruct(model, [ReconUnit("0", model[0])], xs, settings, lambda m, x: m(x), progress=False)
    api.assert_fully_quantized(model)
    with torch.no_grad():
        return sum(float((model(x) - (x @ original.T + model[0].bias)).pow(2).mean()) for x in xs)


def test_reconstruction_after_acnr_fits_the_original_float_layer() -> None:
    fixed, before_fix = _reconstructed_error(False), _reconstructed_error(True)
    assert fixed < 0.85 * before_fix, (fixed, before_fix)
