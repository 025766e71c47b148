"""SAM reconstruction (``recon_sam``) on a small random SAM: unit chain, error, evaluation state, resume."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_runner import Prompts, SamSample, decode_boxes, prepare_image
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization.api import (
    NotFullyQuantizedError,
    assert_fully_quantized,
    iter_quantizers,
    quantization_disabled,
    set_mode,
)
from ahcq.quantization.config import load_qconfig, parse_qconfig
from ahcq.quantization.quantizers import AdaRoundQuantizer, Mode
from ahcq.solver.calibration import calibrate
from ahcq.solver.feature_cache import CachedImage
from ahcq.solver.image_ptq import CalibSample
from ahcq.solver.recon.sam import prepare_samples, reconstruct_sam, sam_chain
from ahcq.solver.recon.sam_units import EncoderStageUnit

SIZES = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, window_size=4,
             global_attn_indexes=(1, 3), out_chans=32, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=64,
             iou_head_hidden_dim=32)
BOXES = [[2, 3, 30, 40], [10, 5, 60, 45], [0, 0, 20, 20], [30, 20, 63, 47], [5, 10, 40, 30]]


def tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_sam(**SIZES)


def calib_samples(sam, n: int = 2, boxes: int = 3) -> list[CalibSample]:
    """Random 48x64 photos with a few boxes each, prepared as the pipeline prepares them."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n):
        image = prepare_image(sam, rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        chosen = torch.tensor(BOXES[:boxes], dtype=torch.float32)
        prompts = Prompts(chosen, torch.ones(boxes), torch.zeros(boxes, dtype=torch.long))
        samples.append(CalibSample(CachedImage(f"img{i}", f"img{i}.jpg", i, SamSample(image, prompts)), None))
    return samples


def qconfig(preset: str = "brecq", **recon):
    data = load_qconfig(f"exp/{preset}/w4a4.yaml").to_dict()
    data["recon"] = {**data["recon"], **recon}
    return parse_qconfig(data)


def pipeline_forward(sam):
    """The pipeline's forward: encoder, then the decoder over the boxes in chunks of 2."""
    def forward(sample: CalibSample) -> None:
        with torch.no_grad():
            embedding = sam.image_encoder(sample.cached.sample.image.tensor)
        decode_boxes(sam, embedding, sample.cached.sample.image, sample.cached.sample.prompts.boxes, 2)
    return forward


def calibrated(cfg, seed: int = 0, calibrate_it: bool = True):
    sam = tiny_sam(seed)
    samples = calib_samples(sam)
    quantize_sam(sam, cfg, quant_encoder=True)
    if calibrate_it:
        calibrate(sam, samples, pipeline_forward(sam), cfg)
    return sam, samples


def upstream_transformer_output(sam, sample: CalibSample, embedding=None):
    """``(queries, keys)`` leaving the two-way transformer when upstream ``MaskDecoder`` runs all boxes."""
    image, boxes = sample.cached.sample.image, sample.cached.sample.prompts.boxes
    seen = []
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            embedding = sam.image_encoder(image.tensor) if embedding is None else embedding
            decode_boxes(sam, embedding, image, boxes, box_chunk=len(boxes))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize(("preset", "units"), [("qdrop", "blocks"), ("saqsam", "stages"),
                                               ("ahcqsam", "layers")])
def test_unit_chain_equals_upstream_sam_in_float(preset, units):
    reference = tiny_sam()
    cfg = qconfig(preset, units=units)
    sam, samples = calibrated(cfg, calibrate_it=False)  # quantizers built, OFF
    chain = sam_chain(sam, cfg)
    prepared, _ = prepare_samples(sam, samples, 32, 0, torch.device("cpu"), use_embedding=False)
    for p, sample in zip(prepared, samples):
        with torch.no_grad():
            ours = chain(sam, p)
        expected = upstream_transformer_output(reference, sample)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


def test_units_cover_every_quantizer_exactly_once():
    for units, expected in [("blocks", 2 * 4 + 1 + 4 * 2 + 1), ("stages", 2 + 1 + 2 + 1)]:
        sam, _ = calibrated(qconfig(units=units), calibrate_it=False)
        chain = sam_chain(sam, qconfig(units=units))
        assert len(chain.units) == expected
        owned = [id(q) for u in chain.units for q in u.quantizers]
        assert len(owned) == len(set(owned))
        assert set(owned) == {id(q) for _, q in iter_quantizers(sam)}
    names = [u.name for u in chain.units]
    assert names[:2] == ["image_encoder.blocks.0-1", "image_encoder.blocks.2-3"]  # closed by global blocks


def test_stage_compares_the_float_decoder_image_tokens_after_layer_skipping():
    sam, samples = calibrated(qconfig("saqsam"), calibrate_it=False)
    chain = sam_chain(sam, qconfig("saqsam"))
    stage = chain.units[0]
    assert isinstance(stage.module, EncoderStageUnit) and stage.output == 1
    assert {q.name.split(".")[2] for q in stage.quantizers} == {"0", "1"}  # neck/decoder are not trained
    p = prepare_samples(sam, samples, 16, 0, torch.device("cpu"), use_embedding=False)[0][0]
    enc = sam.image_encoder
    with torch.no_grad():
        x = enc.patch_embed(p.image) + enc.pos_embed
        out, image_tokens = stage.module(x, p.tokens, p.dense, p.image_pe)
        skipped = enc.neck(enc.blocks[1](enc.blocks[0](x)).permute(0, 3, 1, 2))  # blocks 2-3 skipped
    assert torch.equal(out, enc.blocks[1](enc.blocks[0](x)))
    expected = upstream_transformer_output(sam, samples[0], embedding=skipped)[1]
    assert torch.allclose(image_tokens, expected, atol=1e-6)


def chain_output_error(sam, samples) -> float:
    """Squared error of the quantized chain's final (queries, keys) against the float ones."""
    chain = sam_chain(sam, qconfig())
    prepared, _ = prepare_samples(sam, samples, 32, 0, torch.device("cpu"), use_embedding=False)
    total = 0.0
    with torch.no_grad():
        for p in prepared:
            quant = chain(sam, p)
            with quantization_disabled(sam):
                ref = chain(sam, p)
            total += sum(float((a - b).pow(2).mean()) for a, b in zip(quant, ref))
    return total


def nearest(sam):
    plain = copy.deepcopy(sam)
    set_mode(plain, Mode.QUANTIZE)
    for _, q in iter_quantizers(plain):
        if isinstance(q, AdaRoundQuantizer):
            q.harden()
    return plain


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_reconstruction_lowers_the_output_error_of_calibration_only(cache_dtype):
    cfg = qconfig(iters=25, weight_lr=3e-2, scale_lr=1e-3, cache_dtype=cache_dtype, act_quant=True)
    sam, samples = calibrated(cfg)
    baseline = chain_output_error(nearest(sam), samples)
    report = reconstruct_sam(sam, samples, cfg, device="cpu", progress=False)
    assert chain_output_error(sam, samples) < 0.8 * baseline
    assert [u["steps"] for u in report["units"]] == [25] * 18
    assert report["boxes_per_image"] == [3, 3] and report["max_boxes"] == 32
    json.dumps(report, allow_nan=False)


def test_evaluation_refuses_a_dropping_quantizer_or_soft_rounding():
    cfg = qconfig("qdrop", iters=3)
    sam, samples = calibrated(cfg)
    reconstruct_sam(sam, samples, cfg, device="cpu", progress=False)
    assert_fully_quantized(sam)  # what the pipeline asserts before evaluating
    drop = copy.deepcopy(sam)
    drop.image_encoder.blocks[2].mlp.lin1.input_quantizer.set_mode(Mode.DROP, drop_p=0.5)
    with pytest.raises(NotFullyQuantizedError) as err:
        assert_fully_quantized(drop)
    assert err.value.offenders[0][0] == "image_encoder.blocks.2.mlp.lin1.input_quantizer"
    soft = copy.deepcopy(sam)
    soft.mask_decoder.transformer.layers[1].mlp.lin2.weight_quantizer.hard.fill_(False)
    set_mode(soft, Mode.QUANTIZE)  # the pipeline's last step cannot harden it behind the assert's back
    with pytest.raises(NotFullyQuantizedError, match="layers.1.mlp.lin2.weight_quantizer"):
        assert_fully_quantized(soft)


def test_a_drop_left_behind_by_a_unit_stops_the_reconstruction():
    cfg = qconfig("qdrop", iters=2)
    sam, samples = calibrated(cfg)

    def sabotage(k, unit, report):
        if k == 0:
            sam.image_encoder.blocks[0].attn.qkv.input_quantizer.set_mode(Mode.DROP, drop_p=0.5)

    with pytest.raises(NotFullyQuantizedError, match="blocks.0.attn.qkv.input_quantizer"):
        reconstruct_sam(sam, samples, cfg, device="cpu", progress=False, on_unit_end=sabotage)


class Interrupt(Exception):
    pass


def test_resumed_reconstruction_equals_the_uninterrupted_one(tmp_path):
    cfg = qconfig("qdrop", iters=4)
    straight, samples = calibrated(cfg)
    reconstruct_sam(straight, samples, cfg, device="cpu", progress=False, state_dir=tmp_path / "a")

    def stop(k, unit, report):
        if k == 10:
            raise Interrupt

    broken, _ = calibrated(cfg)
    with pytest.raises(Interrupt):
        reconstruct_sam(broken, samples, cfg, device="cpu", progress=False, state_dir=tmp_path / "b",
                        on_unit_end=stop)
    resumed, _ = calibrated(cfg, calibrate_it=False)  # a new process: the state brings the calibration
    report = reconstruct_sam(resumed, samples, cfg, device="cpu", progress=False, state_dir=tmp_path / "b")
    assert report["resumed_at"] == 11 and len(report["units"]) == 18 - 11
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_fully_quantized(resumed)


def test_prompts_are_capped_by_a_seeded_subset_and_par_trains_the_last_unit_longer():
    cfg = qconfig("saqsam", iters=2, iters_CAMS=3)
    sam = tiny_sam()
    samples = calib_samples(sam, boxes=5)
    quantize_sam(sam, cfg, quant_encoder=True)
    calibrate(sam, samples, pipeline_forward(sam), cfg)
    report = reconstruct_sam(sam, samples, cfg, device="cpu", progress=False, max_boxes=4)
    assert report["max_boxes"] == 4 and report["boxes_per_image"] == [4, 4]
    assert report["granularity"] == "stages" and report["par"] == {"alpha": 1.0, "beta": 1.0,
                                                                                "query_weight": 0.01}
    steps = {u["name"]: u["steps"] for u in report["units"]}
    assert steps == {"image_encoder.blocks.0-1": 3, "image_encoder.blocks.2-3": 3, "image_encoder.neck": 2,
                     "mask_decoder.transformer.layers.0": 2, "mask_decoder.transformer.layers.1": 2,
                     "mask_decoder.transformer.final_attn_token_to_image": 10}
    assert_fully_quantized(sam)
    # PAR's float tails (neck, later layers, final attention) pass gradients on but keep none
    weights = {n: p.grad for n, p in sam.named_parameters() if "quantizer" not in n}
    kept = [n for n, g in weights.items() if g is not None]
    assert weights and not kept, kept


def test_with_a_float_encoder_only_the_decoder_is_reconstructed_on_the_given_embedding():
    cfg = qconfig("qdrop", iters=2)
    reference, sam = tiny_sam(), tiny_sam()
    samples = calib_samples(sam)
    with torch.no_grad():
        samples = [CalibSample(s.cached, sam.image_encoder(s.cached.sample.image.tensor)) for s in samples]
    quantize_sam(sam, cfg, quant_encoder=False)
    chain = sam_chain(sam, cfg)
    prepared, _ = prepare_samples(sam, samples, 32, 0, torch.device("cpu"), use_embedding=True)
    with torch.no_grad():
        ours = chain(sam, prepared[0])
    expected = upstream_transformer_output(reference, samples[0], embedding=samples[0].embedding)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])

    def forward(sample: CalibSample) -> None:
        image = sample.cached.sample.image
        decode_boxes(sam, sample.embedding, image, sample.cached.sample.prompts.boxes, 2)

    calibrate(sam, samples, forward, cfg)
    report = reconstruct_sam(sam, samples, cfg, device="cpu", progress=False)
    assert len(report["units"]) == 4 * 2 + 1
    assert all(u["name"].startswith("mask_decoder.transformer.") for u in report["units"])
    assert_fully_quantized(sam)
