"""Calibration steps against independent references: BIG keeps the attention output, ACNR from the error
second moment equals ACNR from the raw errors, and recalibration sees the conditioned weights."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_roles import big_sites
from ahcq.models.sam_runner import Prompts, SamImage, SamSample
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization import api
from ahcq.quantization.config import ACNRConfig, load_qconfig, parse_qconfig
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.layers import QuantConv2d, QuantLinear
from ahcq.quantization.quantizers import AdaRoundQuantizer, CAGQuantizer, Mode, Quantizer, Role
from ahcq.quantization.transforms import acnr
from ahcq.solver.calibration import (
    CalibrationReport,
    apply_big,
    calibrate,
    condition_linears,
    switch_to_evaluation,
)
from ahcq.solver.feature_cache import CachedImage
from ahcq.solver.image_ptq import CalibSample, sam_forward

REPO = Path(__file__).resolve().parents[2]
W8A8 = {"a_qconfig": {"bit": 8, "quantizer": "fixed", "observer": "minmax"},
        "w_qconfig": {"bit": 8, "quantizer": "fixed", "observer": "minmax", "ch_axis": 0},
        "recon": {"enabled": False}}


def _sam():
    torch.manual_seed(0)
    return build_tiny_sam(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                          global_attn_indexes=(1,), out_chans=32, decoder_depth=1, decoder_heads=2,
                          decoder_mlp_dim=64, iou_head_hidden_dim=32)


def _samples(sam, n: int = 3) -> list[CalibSample]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        pixels = torch.randint(0, 256, (1, 3, 64, 48), generator=generator).float()
        image = SamImage(sam.preprocess(pixels), (64, 48), (80, 60))
        xy = torch.rand(4, 2, generator=generator) * torch.tensor([30.0, 40.0])
        boxes = torch.cat([xy, xy + torch.tensor([20.0, 30.0])], 1)
        prompts = Prompts(boxes, torch.ones(4), torch.zeros(4, dtype=torch.long))
        samples.append(CalibSample(CachedImage(f"k{i}", f"img{i}.png", i, SamSample(image, prompts)), None))
    return samples


def _decoder_logits(sam, sample: CalibSample) -> torch.Tensor:
    image = sample.cached.sample.image
    with torch.no_grad():
        embedding = sam.image_encoder(image.tensor)
        sparse, dense = sam.prompt_encoder(points=None, boxes=sample.cached.sample.prompts.boxes, masks=None)
        logits, _ = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return logits


def test_big_folds_bimodal_keys_without_changing_the_attention_output():
    sam = _sam()
    qconfig = parse_qconfig({**W8A8, "ptq4sam": {"BIG": True}})
    quantize_sam(sam, qconfig, quant_encoder=False)
    name, attn = big_sites(sam)[0]
    signs = torch.where(torch.arange(attn.k_proj.out_features) % 3 == 0, -1.0, 1.0)
    with torch.no_grad():
        attn.k_proj.weight.mul_(0.05)
        attn.k_proj.bias.copy_(4.0 * signs)  # every key channel sits on +4 or -4: two humps
    samples = _samples(sam)
    with api.quantization_disabled(sam):
        before = [_decoder_logits(sam, s) for s in samples]
    k_weight = attn.k_proj.weight.detach().clone()
    forward = lambda s: sam_forward(sam, s, box_chunk=2, max_boxes=4)  # noqa: E731
    folded = apply_big(sam, samples, forward, qconfig)
    assert folded[name]["folded"] is True and len(folded[name]["peaks"]) == 2
    assert torch.equal(attn.k_proj.bias.detach(), 4.0 * torch.ones_like(signs))
    assert torch.equal(attn.k_proj.weight.detach(), k_weight * signs[:, None])
    with api.quantization_disabled(sam):
        for ref, sample in zip(before, samples):
            torch.testing.assert_close(_decoder_logits(sam, sample), ref, atol=1e-5, rtol=1e-5)


def _ill_conditioned_mlp(layers: int = 1) -> nn.Sequential:
    """Linear layers of condition number 1000 (ReLU between them), quantized W4A4 and calibrated."""
    torch.manual_seed(0)
    modules: list[nn.Module] = []
    for i in range(layers):
        u, _ = torch.linalg.qr(torch.randn(16, 16))
        v, _ = torch.linalg.qr(torch.randn(16, 16))
        linear = nn.Linear(16, 16)
        with torch.no_grad():
            linear.weight.copy_(u @ torch.diag(torch.logspace(0, -3, 16)) @ v.T * 4)
        modules += [linear, nn.ReLU()] if i + 1 < layers else [linear]
    model = nn.Sequential(*modules)
    api.quantize(model, act=api.QuantSpec(bits=4, quantizer="fixed", observer="minmax"),
                 weight=api.QuantSpec(bits=4, quantizer="fixed", observer="minmax",
                                      granularity=PerChannel(0)))
    return model


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(int(n), 16) * torch.linspace(0.1, 3, 16) for n in (5, 9, 7)]


def _calibrated(model: nn.Module, xs: list[torch.Tensor]) -> None:
    with api.calibrating(model), torch.no_grad():
        for x in xs:
            model(x)


ACNR_ARGS = dict(iters=50, lam=0.01, beta=0.001, energy=0.8, min_cond=100.0, target="mean")


def test_local_acnr_from_the_error_moment_equals_acnr_from_the_pooled_raw_errors():
    model, xs = _ill_conditioned_mlp(), _inputs()
    _calibrated(model, xs)
    layer = model[0]
    cfg = ACNRConfig(enabled=True, calib=3, error="local", **ACNR_ARGS)
    deltas = torch.cat([x - layer.input_quantizer.fake_quant(x) for x in xs])  # every token counts once
    expected = acnr(layer.weight.detach().clone(), deltas, **ACNR_ARGS)
    report = condition_linears(model, xs, model, cfg)
    assert not expected.skipped and report["0"]["cond_after"] < report["0"]["cond_before"] / 10
    torch.testing.assert_close(layer.weight.detach(), expected.weight, atol=1e-6, rtol=1e-5)


def test_accumulated_acnr_conditions_each_layer_on_the_original_float_minus_the_quantized_chain():
    """The AHCQ-SAM error term, re-derived by hand in float64: layer 1 sees ``X_fp - Q1(X_q)`` where
    ``X_fp = relu(W0 x + b0)`` of the original weights and ``X_q = relu(W0' Q0(x) + b0)`` of the conditioned
    layer 0 with its input quantized and its weight in float."""
    model, xs = _ill_conditioned_mlp(2), _inputs()
    _calibrated(model, xs)
    first, second = model[0], model[2]
    w0 = first.weight.detach().double().clone()
    b0 = first.bias.detach().double()
    q0, q1 = first.input_quantizer, second.input_quantizer
    expected0 = acnr(w0.float(), torch.cat([x - q0.fake_quant(x) for x in xs]), **ACNR_ARGS).weight
    deltas = []
    for x in xs:
        x_fp = torch.relu(x.double() @ w0.T + b0)
        x_q = torch.relu(q0.fake_quant(x).double() @ expected0.double().T + b0)
        deltas.append(x_fp - q1.fake_quant(x_q.float()).double())
    expected1 = acnr(second.weight.detach().clone(), torch.cat(deltas), **ACNR_ARGS).weight
    report = condition_linears(model, xs, model, ACNRConfig(enabled=True, calib=3, **ACNR_ARGS))
    assert not report["0"]["skipped"] and not report["2"]["skipped"]
    torch.testing.assert_close(first.weight.detach(), expected0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(second.weight.detach(), expected1, atol=1e-5, rtol=1e-4)
    with api.quantization_disabled(model), torch.no_grad():  # the float model is the original one
        torch.testing.assert_close(model(xs[0]).double(),
                                   torch.relu(xs[0].double() @ w0.T + b0) @ second.float_weight.double().T
                                   + second.bias.double(), atol=1e-5, rtol=1e-5)


def test_calibrate_recalibrates_on_the_conditioned_weights():
    sam = _sam()
    qconfig = parse_qconfig({**W8A8, "acnr": {"enabled": True, "min_cond": 1.0, "iters": 20}})
    quantize_sam(sam, qconfig, quant_encoder=True)
    samples = _samples(sam, 2)
    original = {n: m.weight.detach().clone() for n, m in sam.named_modules() if isinstance(m, QuantLinear)}
    report = calibrate(sam, samples, lambda s: sam_forward(sam, s, box_chunk=3, max_boxes=4), qconfig)
    assert report.passes == 2 and report.images == 2
    changed = [n for n, r in report.acnr.items() if not r["skipped"]]
    assert changed and all(report.acnr[n]["cond_after"] <= report.acnr[n]["cond_before"] for n in changed)
    layer = sam.get_submodule(changed[0])
    assert not torch.equal(layer.weight.detach(), original[changed[0]])
    spec = api.QuantSpec(bits=8, quantizer="fixed", observer="minmax", granularity=PerChannel(0))
    fresh = api.build_quantizer(spec, Role.WEIGHT, "fresh")
    fresh.set_mode(Mode.CALIBRATE)
    fresh(layer.weight.detach())
    fresh.set_mode(Mode.OFF)
    torch.testing.assert_close(layer.weight_quantizer.fake_quant(layer.weight.detach()),
                               fresh.fake_quant(layer.weight.detach()), atol=0, rtol=0)
    api.set_mode(sam, Mode.QUANTIZE)
    api.assert_fully_quantized(sam)


def test_calibrate_refuses_an_empty_calibration_set():
    sam = _sam()
    quantize_sam(sam, parse_qconfig(W8A8))
    with pytest.raises(ValueError, match="at least one calibration image"):
        calibrate(sam, [], lambda s: None, parse_qconfig(W8A8))


def test_calibration_leaves_the_float_model_untouched():
    sam = _sam()
    reference = copy.deepcopy(sam)
    samples = _samples(sam, 2)
    quantize_sam(sam, parse_qconfig(W8A8), quant_encoder=True)
    calibrate(sam, samples, lambda s: sam_forward(sam, s, box_chunk=4, max_boxes=4), parse_qconfig(W8A8))
    with api.quantization_disabled(sam):
        for sample in samples:
            torch.testing.assert_close(_decoder_logits(sam, sample), _decoder_logits(reference, sample),
                                       atol=0, rtol=0)


def _weight_grouping_run(tmp_path: Path, apply: bool) -> tuple[CalibrationReport, dict[str, Quantizer]]:
    """The AHCPTQ preset with ``cag.apply_to_weights`` set, calibrated on the tiny SAM."""
    path = tmp_path / f"weights_grouped_{apply}.yaml"
    path.write_text(f"base: {REPO / 'exp' / 'ahcptq' / 'w4a4.yaml'}\n"
                    f"cag: {{apply_to_weights: {str(apply).lower()}, weight_groups: 2}}\n")
    qconfig = load_qconfig(path)
    sam = _sam()
    samples = _samples(sam, 2)
    quantize_sam(sam, qconfig, quant_encoder=True)
    report = calibrate(sam, samples, lambda s: sam_forward(sam, s, box_chunk=4, max_boxes=4), qconfig)
    weights = {n: m.weight_quantizer for n, m in sam.named_modules()
               if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer is not None}
    return report, weights


def test_preset_with_cag_on_weights_shares_two_grids_per_layer(tmp_path):
    report, grouped = _weight_grouping_run(tmp_path, True)
    plain_report, plain = _weight_grouping_run(tmp_path, False)
    grids = {n: set(zip(q.scale.tolist(), q.zero_point.tolist())) for n, q in grouped.items()}
    assert plain_report.weight_groups == {} and set(report.weight_groups) == set(grouped)
    assert report.weight_groups["image_encoder.neck.0"] == 2  # a Conv2d is grouped too
    assert all(len(grids[n]) == g <= 2 for n, g in report.weight_groups.items())
    assert min(len(set(zip(q.scale.tolist(), q.zero_point.tolist()))) for q in plain.values()) > 2
    for name, q in grouped.items():  # each group's grid comes from the per-channel grids it replaced
        for s_g, z_g in grids[name]:
            members = (q.scale == s_g) & (q.zero_point == z_g)
            assert s_g == pytest.approx(plain[name].scale[members].double().mean().item(), rel=1e-5)


def test_evaluation_state_without_reconstruction_merges_cag_to_g(tmp_path):
    """A calibration-only AHCPTQ run is scored with the preset's G CAG groups, not per channel, and with
    every AdaRound weight rounded to nearest."""
    path = tmp_path / "calib_only.yaml"
    path.write_text(f"base: {REPO / 'exp' / 'ahcptq' / 'w4a4.yaml'}\nrecon: {{enabled: false}}\n")
    qconfig = load_qconfig(path)
    sam = _sam()
    samples = _samples(sam, 2)
    quantize_sam(sam, qconfig, quant_encoder=True)
    calibrate(sam, samples, lambda s: sam_forward(sam, s, box_chunk=4, max_boxes=4), qconfig)
    cag = [q for _, q in api.iter_quantizers(sam) if isinstance(q, CAGQuantizer)]
    assert cag and all(int(q.groups) == q.group_index.numel() for q in cag)
    switch_to_evaluation(sam)
    assert all(int(q.groups) == min(qconfig.ahcptq.group, q.group_index.numel()) for q in cag)
    assert all(q.is_hard for _, q in api.iter_quantizers(sam) if isinstance(q, AdaRoundQuantizer))
