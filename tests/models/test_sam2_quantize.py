"""quantize_sam2: quantized scope, role-map kinds per method switch, presets, and video calibration."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import W8A8, kinds
from sam2.modeling.sam.transformer import RoPEAttention
from test_sam2_parity import iou, small_sam2, track, write_clip
from torch import nn

from ahcq.models.sam2 import DEFAULT_KEEP_FLOAT, quantize_sam2
from ahcq.models.sam2_attention import QuantHieraAttention, QuantRoPEAttention, QuantSam2Attention
from ahcq.models.sam2_roles import sam2_big_sites, sam2_role_map
from ahcq.quantization import api
from ahcq.quantization.config import load_qconfig, parse_qconfig
from ahcq.quantization.layers import QuantConv2d, QuantLinear
from ahcq.quantization.quantizers import Mode, Role

EXP = Path(__file__).resolve().parents[2] / "exp" / "sam2"
RECIPE = {
    "ptq4sam": {"BIG": True, "AGQ": True},
    "ahcptq": {"cag": True, "group": 4, "hluq": True},
    "lnq": {"enabled": True, "alphas": [1.0, 50.0]},
    "agq": {"taus": [1, 2]},
}
HIERA, MEM, DEC = "image_encoder.trunk.blocks.1", "memory_attention.layers.0", "sam_mask_decoder.transformer"
FLOAT_LAYERS = (
    "image_encoder.trunk.patch_embed.proj",
    "mask_downsample",
    "sam_mask_decoder.output_upscaling.0",
    "sam_mask_decoder.conv_s0",
    "sam_mask_decoder.conv_s1",
    "sam_mask_decoder.output_hypernetworks_mlps.0.layers.0",
    "sam_mask_decoder.iou_prediction_head.layers.2",
    "sam_mask_decoder.pred_obj_score_head.layers.0",
    "obj_ptr_proj.layers.0",
    "obj_ptr_tpos_proj",
)


def test_quantized_scope_and_float_heads() -> None:
    model = small_sam2()
    before = dict(model.named_modules())
    weights = {n: m.weight for n, m in before.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    quantize_sam2(model, parse_qconfig(W8A8))
    after = dict(model.named_modules())
    for name in FLOAT_LAYERS:
        assert after[name] is before[name], name
    prompt = [m for n, m in after.items() if n.startswith("sam_prompt")]
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in prompt)
    quantized = sorted(n for n, m in after.items() if isinstance(m, (QuantLinear, QuantConv2d)))
    scope = ("image_encoder.trunk.blocks.", "image_encoder.neck.", "memory_attention.", "memory_encoder.",
             "sam_mask_decoder.transformer.")
    assert quantized == sorted(n for n in weights if n.startswith(scope))
    # Hiera-T: 12 x (qkv, proj, 2 MLP) + 3 stage projections; neck 4; memory attention 4 x (8 proj + FFN 2);
    # memory encoder 5 downsampler convs + pix_feat_proj + 2 x 3 fuser layers + out_proj;
    # decoder 7 x 4 + 2 x 2
    assert len(quantized) == 12 * 4 + 3 + 4 + 4 * 10 + 5 + 1 + 6 + 1 + 28 + 4
    assert all(after[n].weight is weights[n] and after[n].input_quantizer is not None for n in quantized)
    assert all(q.mode is Mode.OFF for _, q in api.iter_quantizers(model))
    assert all(q.name == name for name, q in api.iter_quantizers(model))
    # the AHCQ-SAM SAM2 code folds only where 'cross_attn_token_to_image' is in the name: not the final one
    assert [n for n, _ in sam2_big_sites(model)] == [
        f"{DEC}.layers.0.cross_attn_token_to_image",
        f"{DEC}.layers.1.cross_attn_token_to_image",
    ]
    with pytest.raises(TypeError, match="expects a QConfig"):
        quantize_sam2(small_sam2(), W8A8)
    with pytest.raises(TypeError, match="expects a sam2 SAM2Base"):
        quantize_sam2(model.memory_encoder, parse_qconfig(W8A8))


def test_role_map_places_the_ahcq_sam_sam2_recipe() -> None:
    model = quantize_sam2(small_sam2(), parse_qconfig({**W8A8, **RECIPE}))
    k = kinds(model)
    expected = {
        f"{HIERA}.attn.qkv.input_quantizer": ("LSQQuantizer", Role.INPUT),  # no CAG in the encoder
        f"{HIERA}.attn.q_quantizer": ("LSQQuantizer", Role.QUERY),
        f"{HIERA}.attn.k_quantizer": ("LSQQuantizer", Role.KEY),
        f"{HIERA}.attn.v_quantizer": ("LSQQuantizer", Role.VALUE),
        f"{HIERA}.attn.prob_quantizer": ("LNQuantizer", Role.ATTN_PROB),
        f"{HIERA}.proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{HIERA}.mlp.layers.0.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{HIERA}.mlp.layers.1.input_quantizer": ("HLUQuantizer", Role.INPUT),
        f"{HIERA}.mlp.layers.1.weight_quantizer": ("FixedQuantizer", Role.WEIGHT),
        "image_encoder.neck.convs.3.conv.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{MEM}.self_attn.q_proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{MEM}.cross_attn_image.k_quantizer": ("LSQQuantizer", Role.KEY),
        f"{MEM}.cross_attn_image.prob_quantizer": ("AGQuantizer", Role.ATTN_PROB),
        f"{MEM}.linear2.input_quantizer": ("LSQQuantizer", Role.INPUT),
        "memory_encoder.mask_downsampler.encoder.0.input_quantizer": ("LSQQuantizer", Role.INPUT),
        "memory_encoder.fuser.layers.1.dwconv.input_quantizer": ("LSQQuantizer", Role.INPUT),
        "memory_encoder.fuser.layers.1.pwconv2.input_quantizer": ("LSQQuantizer", Role.INPUT),
        "memory_encoder.out_proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{DEC}.layers.0.self_attn.q_proj.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{DEC}.final_attn_token_to_image.v_proj.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{DEC}.layers.1.cross_attn_token_to_image.k_quantizer": ("LSQQuantizer", Role.KEY),
        f"{DEC}.layers.1.cross_attn_image_to_token.prob_quantizer": ("AGQuantizer", Role.ATTN_PROB),
        f"{DEC}.layers.0.cross_attn_image_to_token.out_proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{DEC}.layers.0.mlp.layers.0.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{DEC}.layers.0.mlp.layers.1.input_quantizer": ("HLUQuantizer", Role.INPUT),
    }
    assert {name: k[name] for name in expected} == expected
    no_lnq = kinds(quantize_sam2(small_sam2(), parse_qconfig({**W8A8, "ptq4sam": {"AGQ": True}})))
    assert no_lnq[f"{HIERA}.attn.prob_quantizer"][0] == "AGQuantizer"
    assert no_lnq[f"{HIERA}.mlp.layers.1.input_quantizer"][0] == "LSQQuantizer"
    plain = kinds(quantize_sam2(small_sam2(), parse_qconfig(W8A8)))
    assert {kind for kind, role in plain.values() if role is not Role.WEIGHT} == {"LSQQuantizer"}


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_presets_load_and_resolve_the_recipe(bits: int) -> None:
    qconfig = load_qconfig(EXP / f"w{bits}a{bits}.yaml")
    assert (qconfig.a_qconfig.bit, qconfig.w_qconfig.bit) == (bits, bits)
    assert qconfig.method == "sam2" and qconfig.lnq.enabled
    assert (qconfig.calibrate, qconfig.calibrate_frames) == (8, 4) and qconfig.recon.units == "blocks"
    assert qconfig.recon.dropping and qconfig.recon.drop_prob == 0.5 and qconfig.recon.iters == 20000
    assert qconfig.ptq4sam.big and qconfig.acnr.enabled and qconfig.cag.groups == 4
    resolved = {(a.pattern, a.slot): a.overrides.get("quantizer") for a in sam2_role_map(qconfig)}
    assert resolved[("image_encoder.trunk.blocks.*.attn", "prob")] == "lnq"
    assert resolved[("memory_attention.layers.*.*attn*", "prob")] == "agq"
    assert resolved[("sam_mask_decoder.transformer.*attn*", "prob")] == "agq"
    assert resolved[("image_encoder.trunk.blocks.*.attn.qkv", "input")] is None
    assert resolved[("sam_mask_decoder.transformer.*.q_proj", "input")] == "cag"


def test_overrides_keep_float_and_uncovered_layers_fail_loudly() -> None:
    cfg = parse_qconfig({
        **W8A8,
        "decoder_a_qconfig": {"bit": 6},
        "overrides": [
            {"pattern": "memory_attention.layers.1.*", "float": True},
            {"pattern": "*final_attn_token_to_image.q_quantizer", "a_qconfig": {"bit": 4}},
        ],
    })
    model = quantize_sam2(small_sam2(), cfg, keep_float=(*DEFAULT_KEEP_FLOAT, "memory_encoder"))
    names = dict(api.iter_quantizers(model))
    assert not any(n.startswith(("memory_encoder", "memory_attention.layers.1.")) for n in names)
    attn = model.memory_attention.layers[1].self_attn
    assert isinstance(attn, QuantRoPEAttention) and attn.q_quantizer is None
    assert type(model.memory_attention.layers[1].linear1) is nn.Linear
    final = f"{DEC}.final_attn_token_to_image"
    assert names[f"{final}.q_quantizer"].bits == 4
    assert names[f"{final}.k_quantizer"].bits == 6
    assert names[f"{final}.out_proj.weight_quantizer"].bits == 8
    assert names[f"{HIERA}.attn.q_quantizer"].bits == 8
    keep = (*DEFAULT_KEEP_FLOAT, "memory_attention")
    whole = quantize_sam2(small_sam2(), parse_qconfig(W8A8), keep_float=keep)
    assert type(whole.memory_attention.layers[0].self_attn) is RoPEAttention
    with pytest.raises(RuntimeError, match="'image_encoder.trunk.patch_embed.proj' is not covered by the"):
        quantize_sam2(small_sam2(), parse_qconfig(W8A8), keep_float=())


def test_video_calibration_then_quantized_tracking(tmp_path) -> None:
    """Calibrate on a tracked clip (as the reference does on videos), then track quantized."""
    write_clip(tmp_path, n_frames=3)
    predictor = small_sam2(video=True)
    reference = track(predictor, tmp_path)
    quantize_sam2(predictor, parse_qconfig({**W8A8, **RECIPE}))
    with api.calibrating(predictor):
        track(predictor, tmp_path)
    api.set_mode(predictor, Mode.QUANTIZE)
    api.assert_fully_quantized(predictor)
    quantized = track(predictor, tmp_path)
    with api.quantization_disabled(predictor):
        disabled = track(predictor, tmp_path)
    for frame, logits in reference.items():
        assert torch.isfinite(quantized[frame]).all()
        assert torch.equal(disabled[frame], logits)  # quantizers OFF: the fused float path again
        assert 0 < float((quantized[frame] - logits).abs().max())
        assert iou(quantized[frame] > 0, logits > 0) > 0.5  # W8A8 keeps the random-weight masks recognisable
    twins = [m for m in predictor.modules() if isinstance(m, (QuantHieraAttention, QuantSam2Attention))]
    assert all(bool(m.prob_quantizer.calibrated) for m in twins)
    assert float(predictor.image_encoder.trunk.blocks[5].attn.prob_quantizer.alpha) in (1.0, 50.0)
