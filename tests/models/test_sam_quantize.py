"""quantize_sam: module tree, role-map kinds per method config, and W8A8 accuracy after calibration."""
from __future__ import annotations

import pytest
import torch
from model_helpers import W8A8, kinds
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.models import QuantDecoderAttention, QuantEncoderAttention, big_sites, build_sam, quantize_sam
from ahcq.quantization import api
from ahcq.quantization.config import parse_qconfig
from ahcq.quantization.layers import QuantConv2d, QuantLinear
from ahcq.quantization.quantizers import Mode, Role

AHCQSAM = {
    **W8A8,
    "ptq4sam": {"BIG": True, "AGQ": True},
    "ahcptq": {"cag": True, "group": 4, "hluq": True},
    "lnq": {"enabled": True},
}
FLOAT_LAYERS = (
    "image_encoder.patch_embed.proj",
    "mask_decoder.output_upscaling.0",
    "mask_decoder.output_upscaling.3",
    "mask_decoder.output_hypernetworks_mlps.0.layers.0",
    "mask_decoder.iou_prediction_head.layers.2",
)


def tiny_sam(seed: int = 0, model_type: str = "vit_b"):
    """SAM classes and pattern (windowed + global blocks, rel-pos, neck) at a size that calibrates fast."""
    torch.manual_seed(seed)
    if model_type != "vit_b":  # the variant's real depth and global indexes, small widths
        return build_sam(model_type, img_size=64, embed_dim=32, prompt_embed_dim=64, decoder_mlp_dim=128)
    return build_sam(
        "vit_b", img_size=128, embed_dim=48, depth=4, global_attn_indexes=(1, 3), window_size=4,
        prompt_embed_dim=64, decoder_mlp_dim=128, iou_head_hidden_dim=64,
    )


def batch(sam, n_boxes: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    size = sam.image_encoder.img_size
    xy = torch.rand(n_boxes, 2, generator=g) * size * 0.5
    return [{
        "image": torch.rand(3, size, size, generator=g) * 255,
        "original_size": (size, size),
        "boxes": torch.cat([xy, xy + size * 0.4], dim=1),
    }]


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_module_tree_swaps_quantized_scope_and_keeps_the_rest(model_type: str) -> None:
    sam = tiny_sam(model_type=model_type)
    depth = len(sam.image_encoder.blocks)
    before = dict(sam.named_modules())
    weights = {name: m.weight for name, m in before.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    quantize_sam(sam, parse_qconfig(W8A8))
    after = dict(sam.named_modules())
    for name in FLOAT_LAYERS:
        assert after[name] is before[name], name
    quantized = [n for n, m in after.items() if isinstance(m, (QuantLinear, QuantConv2d))]
    in_scope = [
        n for n in weights
        if n.startswith(("image_encoder.blocks.", "image_encoder.neck.", "mask_decoder.transformer."))
    ]
    assert sorted(quantized) == sorted(in_scope)
    assert len(quantized) == depth * 4 + 2 + 7 * 4 + 2 * 2  # blocks, neck, decoder attentions, decoder MLPs
    for name in quantized:
        layer = after[name]
        assert layer.weight is weights[name], name
        assert layer.input_quantizer is not None and layer.weight_quantizer.ch_axis == 0, name
    assert all(
        isinstance(after[f"image_encoder.blocks.{i}.attn"], QuantEncoderAttention) for i in range(depth)
    )
    assert all(q.mode is Mode.OFF for _, q in api.iter_quantizers(sam))
    assert isinstance(after["mask_decoder.transformer.final_attn_token_to_image"], QuantDecoderAttention)
    assert [n for n, _ in big_sites(sam)] == [
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image",
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image",
        "mask_decoder.transformer.final_attn_token_to_image",
    ]


def test_role_map_kinds_follow_the_method_switches() -> None:
    sam = quantize_sam(tiny_sam(), parse_qconfig(AHCQSAM))
    k = kinds(sam)
    enc, dec = "image_encoder.blocks.1", "mask_decoder.transformer"
    expected = {
        f"{enc}.attn.qkv.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{enc}.attn.q_quantizer": ("LSQQuantizer", Role.QUERY),
        f"{enc}.attn.k_quantizer": ("LSQQuantizer", Role.KEY),
        f"{enc}.attn.v_quantizer": ("LSQQuantizer", Role.VALUE),
        f"{enc}.attn.prob_quantizer": ("LNQuantizer", Role.ATTN_PROB),  # AHCQ-SAM: LNQ on every softmax
        f"{enc}.attn.proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{enc}.mlp.lin1.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{enc}.mlp.lin2.input_quantizer": ("HLUQuantizer", Role.INPUT),
        f"{enc}.mlp.lin2.weight_quantizer": ("FixedQuantizer", Role.WEIGHT),
        "image_encoder.neck.2.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{dec}.layers.0.self_attn.q_proj.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{dec}.final_attn_token_to_image.v_proj.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{dec}.layers.1.cross_attn_token_to_image.k_quantizer": ("LSQQuantizer", Role.KEY),
        f"{dec}.layers.1.cross_attn_image_to_token.prob_quantizer": ("LNQuantizer", Role.ATTN_PROB),
        f"{dec}.final_attn_token_to_image.prob_quantizer": ("LNQuantizer", Role.ATTN_PROB),
        f"{dec}.layers.0.cross_attn_image_to_token.out_proj.input_quantizer": ("LSQQuantizer", Role.INPUT),
        f"{dec}.layers.0.mlp.lin1.input_quantizer": ("CAGQuantizer", Role.INPUT),
        f"{dec}.layers.0.mlp.lin2.input_quantizer": ("HLUQuantizer", Role.INPUT),
    }
    assert {name: k[name] for name in expected} == expected
    assert all(q.name == name for name, q in api.iter_quantizers(sam))
    assert sam.mask_decoder.transformer.layers[0].mlp.lin1.input_quantizer.target_groups == 4

    ptq4sam = quantize_sam(tiny_sam(), parse_qconfig({**W8A8, "ptq4sam": {"AGQ": True}}))
    assert kinds(ptq4sam)[f"{dec}.final_attn_token_to_image.prob_quantizer"][0] == "AGQuantizer"
    assert kinds(ptq4sam)[f"{enc}.attn.prob_quantizer"][0] == "AGQuantizer"
    assert kinds(ptq4sam)[f"{enc}.mlp.lin2.input_quantizer"][0] == "LSQQuantizer"
    plain = kinds(quantize_sam(tiny_sam(), parse_qconfig(W8A8)))
    assert {kind for kind, role in plain.values() if role is not Role.WEIGHT} == {"LSQQuantizer"}


def test_quant_encoder_false_and_overrides() -> None:
    cfg = parse_qconfig({
        **W8A8,
        "decoder_a_qconfig": {"bit": 6},
        "overrides": [
            {"pattern": "mask_decoder.transformer.layers.1.*", "float": True},
            {"pattern": "*final_attn_token_to_image.q_quantizer", "a_qconfig": {"bit": 4}},
        ],
    })
    sam = quantize_sam(tiny_sam(), cfg, quant_encoder=False)
    names = dict(api.iter_quantizers(sam))
    assert not any(n.startswith("image_encoder") for n in names)
    assert type(sam.image_encoder.blocks[0].attn) is sam_image_encoder.Attention
    assert type(sam.image_encoder.neck[0]) is nn.Conv2d
    assert not any(n.startswith("mask_decoder.transformer.layers.1.") for n in names)
    assert type(sam.mask_decoder.transformer.layers[1].mlp.lin1) is nn.Linear
    final = "mask_decoder.transformer.final_attn_token_to_image"
    assert names[f"{final}.q_quantizer"].bits == 4
    assert names[f"{final}.k_quantizer"].bits == 6
    assert names[f"{final}.out_proj.input_quantizer"].bits == 6
    assert names[f"{final}.out_proj.weight_quantizer"].bits == 8
    with pytest.raises(TypeError, match="expects a QConfig"):
        quantize_sam(tiny_sam(), W8A8)


def test_w8a8_after_calibration_is_close_to_float() -> None:
    sam = tiny_sam()
    inputs = batch(sam)
    with torch.no_grad():
        ref = sam(inputs, multimask_output=False)[0]
        quantize_sam(sam, parse_qconfig(W8A8))
        assert torch.equal(sam(inputs, multimask_output=False)[0]["low_res_logits"], ref["low_res_logits"])
        with api.calibrating(sam):
            sam(batch(sam, seed=2), multimask_output=False)
            sam(inputs, multimask_output=False)
        api.set_mode(sam, Mode.QUANTIZE)
        api.assert_fully_quantized(sam)
        out = sam(inputs, multimask_output=False)[0]
        with api.quantization_disabled(sam):
            off = sam(inputs, multimask_output=False)[0]
    assert torch.equal(off["low_res_logits"], ref["low_res_logits"])
    a, b = out["masks"], ref["masks"]
    iou = (a & b).sum(dim=(-1, -2)) / (a | b).sum(dim=(-1, -2))
    assert bool((iou >= 0.9).all()), iou
    rel = (out["low_res_logits"] - ref["low_res_logits"]).norm() / ref["low_res_logits"].norm()
    assert 0 < float(rel) < 0.1


def test_layer_outside_the_role_map_is_refused() -> None:
    sam = tiny_sam()
    sam.mask_decoder.transformer.layers[0].extra = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"'mask_decoder.transformer.layers.0.extra' would be quantized but"):
        quantize_sam(sam, parse_qconfig(W8A8))
    assert not list(api.iter_quantizers(sam))
    assert type(sam.mask_decoder.transformer.layers[0].self_attn) is sam_transformer.Attention
    quantize_sam(sam, parse_qconfig({**W8A8, "overrides": [{"pattern": "re:.*\\.extra", "float": True}]}))
    assert type(sam.mask_decoder.transformer.layers[0].extra) is nn.Linear
    with pytest.raises(ValueError, match="already holds quantizer 'image_encoder.blocks.0.attn.q_quantizer'"):
        quantize_sam(sam, parse_qconfig(W8A8))


def test_ptq4sam_ahcptq_quantizers_calibrate_through_the_decoder_twins() -> None:
    """AGQ gets ``value=`` from the twins and HLUQ ``next_layer=`` from QuantLinear: both must calibrate."""
    cfg = parse_qconfig({**W8A8, "ptq4sam": {"AGQ": True}, "ahcptq": {"cag": True, "hluq": True}})
    sam = tiny_sam()
    inputs = batch(sam, n_boxes=2)
    with torch.no_grad():
        ref = sam(inputs, multimask_output=False)[0]
        quantize_sam(sam, cfg, quant_encoder=False)
        with api.calibrating(sam):
            sam(inputs, multimask_output=False)
        api.set_mode(sam, Mode.QUANTIZE)
        out = sam(inputs, multimask_output=False)[0]
    families = {type(q).__name__ for _, q in api.iter_quantizers(sam)}
    assert families >= {"AGQuantizer", "CAGQuantizer", "HLUQuantizer"}
    a, b = out["masks"], ref["masks"]
    iou = (a & b).sum(dim=(-1, -2)) / (a | b).sum(dim=(-1, -2))
    assert bool((iou >= 0.9).all()), iou


def test_cag_operands_group_every_decoder_q_and_k_and_calibrate() -> None:
    """``cag.operands``: CAG on the q and k of every decoder attention (the encoder's stay uniform); the
    grouped operands calibrate through the twins and keep the masks."""
    dec = "mask_decoder.transformer"
    plain = kinds(quantize_sam(tiny_sam(), parse_qconfig(AHCQSAM)))
    cfg = parse_qconfig({**AHCQSAM, "cag": {"operands": True}})
    sam = tiny_sam()
    inputs = batch(sam, n_boxes=2)
    with torch.no_grad():
        ref = sam(inputs, multimask_output=False)[0]
        quantize_sam(sam, cfg)
        grouped = kinds(sam)
        with api.calibrating(sam):
            sam(inputs, multimask_output=False)
        api.set_mode(sam, Mode.QUANTIZE)
        out = sam(inputs, multimask_output=False)[0]
    changed = {name for name in grouped if grouped[name] != plain[name]}
    attentions = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    expected = {f"{dec}.layers.{i}.{a}.{s}_quantizer" for i in (0, 1) for a in attentions for s in "qk"}
    expected |= {f"{dec}.final_attn_token_to_image.{s}_quantizer" for s in "qk"}
    assert changed == expected
    assert {grouped[name] for name in expected} == {("CAGQuantizer", Role.QUERY), ("CAGQuantizer", Role.KEY)}
    a, b = out["masks"], ref["masks"]
    iou = (a & b).sum(dim=(-1, -2)) / (a | b).sum(dim=(-1, -2))
    assert bool((iou >= 0.9).all()), iou


def test_grouped_key_makes_q_k_product_a_sum_of_one_integer_sub_product_per_group() -> None:
    """What makes ``cag.operands`` hardware-compatible: after regrouping, a key's channels share G (scale,
    zero point) pairs, so ``q·kᵀ`` equals the sum over groups of scale × (q · (codes − zero point)) on that
    group's channels, re-derived here in float64 from the integer codes."""
    sam = tiny_sam()
    inputs = batch(sam, n_boxes=2)
    quantize_sam(sam, parse_qconfig({**AHCQSAM, "cag": {"operands": True}}))
    attn = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    seen = {}
    attn.k_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("k", out.detach()))
    with torch.no_grad(), api.calibrating(sam):
        sam(inputs, multimask_output=False)
    quantizer = attn.k_quantizer
    quantizer.regroup(4)
    quantizer.set_mode(Mode.QUANTIZE)
    k = seen["k"]
    codes = quantizer.quantize_int(k).double()
    scale, zero_point = (t.detach().double() for t in quantizer.channel_params())
    assert len({(float(s), float(z)) for s, z in zip(scale, zero_point)}) <= 4
    q = torch.randn(5, k.shape[-1], dtype=torch.float64)
    product = q @ quantizer(k).double()[0].T
    summed = torch.zeros_like(product)
    for g in quantizer.group_index.unique():
        members = quantizer.group_index == g
        s, z = scale[members][0], zero_point[members][0]
        summed += s * (q[:, members] @ (codes[0][:, members] - z).T)
    torch.testing.assert_close(summed, product, rtol=1e-6, atol=1e-6)
