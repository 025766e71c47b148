"""Each preset does what its reference code does (see docs/fidelity.md): the properties below are written
from the reference code (AHCQ-SAM, SAQ-SAM, PTQ4SAM), each checked on a small model against an independent
computation."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_recon_sam import calib_samples, pipeline_forward, qconfig, tiny_sam

from ahcq.models.sam2 import quantize_sam2
from ahcq.models.sam_attention import QuantDecoderAttention, QuantEncoderAttention
from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization import api
from ahcq.quantization.config import ReconUnits, load_qconfig, parse_qconfig
from ahcq.quantization.quantizers import LSQQuantizer, Mode, Role
from ahcq.solver.calibration import calibrate
from ahcq.solver.recon import ReconSettings, unit_loss
from ahcq.solver.recon.sam import prepare_samples, reconstruct_sam, sam_chain
from ahcq.solver.recon.sam2 import sam2_units, tracking, unit_samples
from ahcq.solver.recon.units import tensor_leaves
from ahcq.video.calibration import CalibrationClip, track_clip
from ahcq.video.propagation import DEFAULT_TRACKING

REPO = Path(__file__).resolve().parents[2]


def test_ahcqsam_preset_is_the_reference_recipe() -> None:
    cfg = load_qconfig(REPO / "exp" / "ahcqsam" / "w4a4.yaml")
    assert cfg.recon.units == "layers" and cfg.lnq.enabled and cfg.acnr.error == "accumulated"
    assert (cfg.acnr.iters, cfg.acnr.beta) == (200, 0.002)
    assert load_qconfig(REPO / "exp" / "ahcqsam" / "w6a6.yaml").acnr.iters == 20  # the reference's k: 20
    sam = tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    probs = {n: type(q).__name__ for n, q in api.iter_quantizers(sam) if q.role is Role.ATTN_PROB}
    assert probs and set(probs.values()) == {"LNQuantizer"}  # encoder and decoder softmax alike
    chain = sam_chain(sam, cfg)
    assert [u.name for u in chain.units] == [
        *(f"image_encoder.blocks.{i}" for i in range(4)), "image_encoder.neck",
        "mask_decoder.transformer.layers.0", "mask_decoder.transformer.layers.1",
        "mask_decoder.transformer.final_attn_token_to_image"]
    assert chain.units[0].module is sam.image_encoder.blocks[0]  # the whole upstream ViT block


def test_whole_layer_units_chain_to_the_float_model_output() -> None:
    """The AHCQ-SAM chain (whole blocks, whole two-way layers) with quantizers off is the float SAM."""
    cfg = load_qconfig(REPO / "exp" / "ahcqsam" / "w4a4.yaml")
    sam = tiny_sam()
    reference = copy.deepcopy(sam)
    samples = calib_samples(sam)
    quantize_sam(sam, cfg, quant_encoder=True)
    prepared, _ = prepare_samples(sam, samples, 32, 0, torch.device("cpu"), use_embedding=False)
    with torch.no_grad(), api.quantization_disabled(sam):
        queries, keys = sam_chain(sam, cfg)(sam, prepared[0])
        embedding = reference.image_encoder(samples[0].cached.sample.image.tensor)
        n = prepared[0].tokens.shape[0]
        src = torch.repeat_interleave(embedding, n, 0) + prepared[0].dense
        pos = torch.repeat_interleave(prepared[0].image_pe, n, 0)
        expected_q, expected_k = reference.mask_decoder.transformer(src, pos, prepared[0].tokens)
    torch.testing.assert_close(queries, expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, expected_k, atol=1e-5, rtol=1e-5)


def test_saqsam_decoder_layer_loss_weighs_queries_a_hundredth() -> None:
    """SAQ-SAM: ``beta * (0.01 * L(queries) + L(keys)) + alpha * PAR`` with L = sum over channels, mean."""
    cfg = load_qconfig(REPO / "exp" / "saqsam" / "w4a4.yaml")
    assert cfg.recon.weight == 0.0 and cfg.pcc.passes == 2 and cfg.attention.rel_pos_float_q
    sam = tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    layer = next(u for u in sam_chain(sam, cfg).units if u.name == "mask_decoder.transformer.layers.0")
    generator = torch.Generator().manual_seed(0)
    preds = [torch.randn(3, 7, 32, generator=generator) for _ in range(3)]
    targets = [torch.randn(3, 7, 32, generator=generator) for _ in range(3)]
    lp = [float((p - t).pow(2).sum(-1).mean()) for p, t in zip(preds, targets)]
    alpha, beta = cfg.par.alpha, cfg.par.beta
    expected = beta * (0.01 * lp[0] + lp[1]) + alpha * lp[2]
    assert float(unit_loss(layer, tuple(preds), targets)) == pytest.approx(expected, rel=1e-6)
    assert ReconSettings.from_qconfig(cfg).weight == 0.0  # no rounding regulariser
    twins = [m for _, m in sam.named_modules() if isinstance(m, QuantEncoderAttention)]
    assert twins and all(t.rel_pos_float_q for t in twins)


def _activation_scales(sam) -> dict[str, torch.Tensor]:
    return {n: q.scale.detach().clone() for n, q in api.iter_quantizers(sam)
            if isinstance(q, LSQQuantizer) and q.role is not Role.WEIGHT}


def test_brecq_reconstructs_with_float_activations() -> None:
    """The references' --brecq: only the weight quantizers run while units train; activations come back on
    for evaluation with their calibrated ranges."""
    cfg = qconfig("brecq", iters=3)
    assert not cfg.recon.act_quant
    sam, samples = _calibrated(cfg)
    before = _activation_scales(sam)
    seen: list[set[Mode]] = []

    def modes(_k, _unit, _report) -> None:
        seen.append({q.mode for _, q in api.iter_quantizers(sam) if q.role is not Role.WEIGHT})

    reconstruct_sam(sam, samples, cfg, device="cpu", progress=False, on_unit_end=modes)
    assert seen and all(s == {Mode.OFF} for s in seen)
    after = _activation_scales(sam)
    assert all(torch.equal(before[n], after[n]) for n in before)
    api.assert_fully_quantized(sam)
    with_acts = qconfig("brecq", iters=3, act_quant=True)
    sam2, samples2 = _calibrated(with_acts)
    reconstruct_sam(sam2, samples2, with_acts, device="cpu", progress=False)
    moved = _activation_scales(sam2)
    assert any(not torch.equal(before[n], moved[n]) for n in before)


def _calibrated(cfg):
    sam = tiny_sam()
    samples = calib_samples(sam)
    quantize_sam(sam, cfg, quant_encoder=True)
    calibrate(sam, samples, pipeline_forward(sam), cfg)
    return sam, samples


def test_ptq4sam_big_gives_every_decoder_key_the_mse_range_search() -> None:
    cfg = load_qconfig(REPO / "exp" / "ptq4sam" / "w4a4.yaml")
    sam = tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    keys = {n: type(m.k_quantizer.observer).__name__ for n, m in sam.named_modules()
            if isinstance(m, QuantDecoderAttention)}
    assert len(keys) == 7 and set(keys.values()) == {"AvgMSEObserver"}
    encoder_keys = {type(m.k_quantizer.observer).__name__ for _, m in sam.named_modules()
                    if isinstance(m, QuantEncoderAttention)}
    assert encoder_keys == {"AvgMinMaxObserver"}  # the encoder's keys keep a_qconfig
    plain = tiny_sam()
    data = cfg.to_dict()
    quantize_sam(plain, parse_qconfig({**data, "ptq4sam": {**data["ptq4sam"], "BIG": False}}))
    assert {type(m.k_quantizer.observer).__name__ for _, m in plain.named_modules()
            if isinstance(m, QuantDecoderAttention)} == {"AvgMinMaxObserver"}


def test_sam2_units_take_their_inputs_from_the_quantized_chain(tmp_path) -> None:
    from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
    from ahcq.video.datasets import read_sav
    from ahcq.video.fixtures import make_moving_shapes_clip

    make_moving_shapes_clip(tmp_path, "sav", n_frames=3, size=(48, 64), n_objects=1, seed=1, video="v0")
    clip = CalibrationClip(read_sav(tmp_path, "val")[0], frames=1)
    torch.manual_seed(0)
    predictor = build_sam2_model("t", [*reduced_overrides(image_size=128),
                                       "++model.memory_attention.num_layers=1", "++model.fill_hole_area=0"],
                                 video=True)
    cfg = parse_qconfig({"a_qconfig": {"bit": 4}, "w_qconfig": {"bit": 4}, "recon": {"iters": 1}})
    quantize_sam2(predictor, cfg)
    calibrate(predictor, [clip], lambda c: track_clip(predictor, c), cfg, big=[])
    api.set_mode(predictor, Mode.QUANTIZE)
    units = {v.unit.name: v for v in sam2_units(predictor)}
    memory = units["memory_attention.layers.0.self_attn"]
    qin, fin, targets = unit_samples(predictor, memory, tracking(predictor, [clip], DEFAULT_TRACKING))
    assert len(qin) == len(fin) == len(targets) >= 1
    q_args, f_args = qin[0], fin[0]
    # the quantized encoder and the quantized memory feed it: its inputs differ from the float chain's
    assert not torch.equal(tensor_leaves(q_args)[0], tensor_leaves(f_args)[0])
    with torch.no_grad(), api.quantization_disabled(predictor):  # the targets are the float module's outputs
        torch.testing.assert_close(memory.unit.module(*f_args[0], **f_args[1]), targets[0][0])
    assert all(q.mode is Mode.QUANTIZE for _, q in api.iter_quantizers(predictor))
    # whole layers: every Hiera block, memory-attention and two-way layer is one unit, the two-way layer
    # compared on both of its streams; SAM2 has no stages
    whole = {v.unit.name: v.unit for v in sam2_units(predictor, ReconUnits.LAYERS)}
    layers = [n for n in whole if n.startswith(("image_encoder.trunk.blocks.", "memory_attention.layers.",
                                                "sam_mask_decoder.transformer.layers."))]
    assert layers and all(n.rsplit(".", 1)[-1].isdigit() for n in layers)
    assert whole["sam_mask_decoder.transformer.layers.0"].output == (0, 1)
    assert set(units) - set(whole) >= {"sam_mask_decoder.transformer.layers.0.mlp", memory.unit.name}
    with pytest.raises(ValueError, match="stages"):
        sam2_units(predictor, ReconUnits.STAGES)
