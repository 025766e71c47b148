"""Twins with empty slots reproduce upstream segment_anything bit for bit, for ViT-B/L/H structures.

The models keep each variant's real depth, global-attention indexes, window size 14 (with padding), rel-pos
and neck; only widths and the image size are reduced so that a forward takes well under a second.
"""
from __future__ import annotations

import pytest
import torch
from model_helpers import IdentitySlot, Recorder
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.models import (
    QuantDecoderAttention,
    QuantEncoderAttention,
    build_sam,
    prepare_sam,
)

DECODER = dict(prompt_embed_dim=64, decoder_mlp_dim=128, iou_head_hidden_dim=64)
# vit_b at 256 px: a 16x16 token grid padded to 28x28 for the 14x14 windows (the 1024 px case pads 64 -> 70)
SMALL = {
    "vit_b": dict(img_size=256, embed_dim=48, **DECODER),
    "vit_l": dict(img_size=224, embed_dim=32, **DECODER),
    "vit_h": dict(img_size=224, embed_dim=32, **DECODER),
}


def small_sam(model_type: str, seed: int = 0):
    """A small ``model_type``-shaped Sam whose zero-initialised embeddings are randomised too."""
    torch.manual_seed(seed)
    sam = build_sam(model_type, **SMALL[model_type])
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, 0.5)
    return sam


def sam_inputs(sam, n_boxes: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    size = sam.image_encoder.img_size
    xy = torch.rand(n_boxes, 2, generator=g) * size * 0.6
    wh = torch.rand(n_boxes, 2, generator=g) * size * 0.4 + 4
    return [
        {
            "image": torch.rand(3, size, size - 32, generator=g) * 255,
            "original_size": (size + 16, size - 16),
            "boxes": torch.cat([xy, xy + wh], dim=1),
        }
    ]


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_prepared_sam_equals_upstream_exactly(model_type: str) -> None:
    sam = small_sam(model_type)
    batch = sam_inputs(sam)
    embeddings = []
    sam.image_encoder.register_forward_hook(lambda module, args, out: embeddings.append(out))
    with torch.no_grad():
        ref_out = sam(batch, multimask_output=True)
    params_before = {name: p for name, p in sam.named_parameters()}

    prepare_sam(sam)

    with torch.no_grad():
        out = sam(batch, multimask_output=True)
    assert len(embeddings) == 2 and torch.equal(embeddings[1], embeddings[0])
    for key in ("masks", "iou_predictions", "low_res_logits"):
        assert torch.equal(out[0][key], ref_out[0][key]), key
    params_after = dict(sam.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)


def test_mask_decoder_equals_upstream_exactly() -> None:
    sam = small_sam("vit_b", seed=3)
    g = torch.Generator().manual_seed(4)
    dim, grid = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, dim, *grid, generator=g)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        args = dict(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        ref = sam.mask_decoder(multimask_output=False, **args)
        prepare_sam(sam, quant_encoder=False)
        out = sam.mask_decoder(multimask_output=False, **args)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_prepare_swaps_exactly_the_quantized_attentions() -> None:
    sam = small_sam("vit_b")
    originals = {n: m for n, m in sam.named_modules() if not isinstance(m, (nn.ModuleList, nn.Sequential))}
    prepare_sam(sam)
    modules = dict(sam.named_modules())
    encoder_attn = [f"image_encoder.blocks.{i}.attn" for i in range(12)]
    decoder_attn = [
        f"mask_decoder.transformer.layers.{i}.{a}"
        for i in range(2)
        for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    ] + ["mask_decoder.transformer.final_attn_token_to_image"]
    assert all(isinstance(modules[n], QuantEncoderAttention) for n in encoder_attn)
    assert all(isinstance(modules[n], QuantDecoderAttention) for n in decoder_attn)
    upstream = (sam_image_encoder.Attention, sam_transformer.Attention)
    left = [n for n, m in modules.items() if isinstance(m, upstream)]
    assert left == []
    # every module outside the swapped attentions is the very same instance under the same name
    for name, module in originals.items():
        if not any(name == a or name.startswith(a + ".") for a in encoder_attn + decoder_attn):
            assert modules[name] is module, name
    # the twin's Linear layers are the original instances
    assert modules["image_encoder.blocks.0.attn.qkv"] is originals["image_encoder.blocks.0.attn.qkv"]
    assert modules["mask_decoder.transformer.final_attn_token_to_image.k_proj"] is originals[
        "mask_decoder.transformer.final_attn_token_to_image.k_proj"
    ]
    assert prepare_sam(sam) is sam and dict(sam.named_modules()).keys() == modules.keys()


def test_keep_float_and_quant_encoder_leave_attentions_upstream() -> None:
    sam = small_sam("vit_b")
    prepare_sam(sam, quant_encoder=False, keep_float=("mask_decoder.transformer.layers.1",))
    modules = dict(sam.named_modules())
    assert type(modules["image_encoder.blocks.0.attn"]) is sam_image_encoder.Attention
    assert type(modules["mask_decoder.transformer.layers.1.self_attn"]) is sam_transformer.Attention
    assert isinstance(modules["mask_decoder.transformer.layers.0.self_attn"], QuantDecoderAttention)
    with pytest.raises(TypeError, match="not the string"):
        prepare_sam(sam, keep_float="prompt_encoder")
    with pytest.raises(TypeError, match="expects a segment_anything Sam"):
        prepare_sam(sam.image_encoder)


def test_slots_sit_where_documented() -> None:
    sam = prepare_sam(small_sam("vit_b"))
    enc = sam.image_encoder.blocks[2].attn  # a global block: 16x16 tokens, 12 heads of 4 channels
    dec = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    recorders = {}
    for owner, tag in ((enc, "enc"), (dec, "dec")):
        for slot in ("q", "k", "v", "prob"):
            recorders[tag, slot] = Recorder()
            owner.set_quantizer(slot, recorders[tag, slot])
    with torch.no_grad():
        sam(sam_inputs(sam, n_boxes=2), multimask_output=False)
    assert recorders["enc", "q"].seen == [((12, 256, 4), ())]
    assert recorders["enc", "prob"].seen == [((12, 256, 256), ("value",))]
    # decoder: 2 boxes, 2 box + 5 output tokens, internal dim 32 (downsample 2), 256 image tokens, 8 heads
    assert recorders["dec", "k"].seen == [((2, 256, 32), ())]
    assert recorders["dec", "q"].seen == [((2, 7, 32), ())]
    assert recorders["dec", "prob"].seen == [((2, 8, 7, 256), ("value",))]
    with pytest.raises(KeyError, match="no slot 'x'"):
        enc.set_quantizer("x", Recorder())


def test_rel_pos_uses_quantized_query_unless_configured() -> None:
    sam = prepare_sam(small_sam("vit_b"))
    attn = sam.image_encoder.blocks[0].attn
    x = torch.randn(4, 14, 14, 48)

    class Coarse(IdentitySlot):
        def forward(self, t: torch.Tensor, **ctx) -> torch.Tensor:
            return torch.round(t * 2) / 2

    attn.set_quantizer("q", Coarse())
    with torch.no_grad():
        quantized_rel = attn(x)
        attn.rel_pos_float_q = True
        float_rel = attn(x)
        nn.init.zeros_(attn.rel_pos_h)
        nn.init.zeros_(attn.rel_pos_w)
        a = attn(x)
        attn.rel_pos_float_q = False
        b = attn(x)
    assert not torch.allclose(quantized_rel, float_rel)
    assert torch.equal(a, b)
