"""SAM2 twins against upstream sam2 (random weights, reduced builds).

With empty slots a twin keeps upstream's fused attention call and must match bit for bit. With a slot in
the probabilities (here an identity module in the slot) it runs the explicit attention that
quantization needs. Its tolerance: upstream's ``F.scaled_dot_product_attention`` runs a fused CPU kernel
that accumulates the softmax blockwise (online max/sum) in another order than the explicit
``softmax(q·kᵀ·scale)·v``; in float32 this moves outputs of magnitude ~1-3 by at most ~3e-6 (measured:
trunk+neck 2.9e-6 (T) and 3.2e-6 (S), memory attention 7e-7, mask decoder 8e-7, video mask logits 3.6e-7).
``ATOL = 2e-5`` leaves headroom for other CPUs' kernels while staying far below any quantization effect
(a 4-bit grid step is ~1e-1 here). Convolution-only parts (memory encoder) must match exactly.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from model_helpers import IdentitySlot, Recorder
from PIL import Image
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import Attention, RoPEAttention
from torch import nn

from ahcq.models.sam2 import prepare_sam2
from ahcq.models.sam2_attention import (
    SAM2_TWIN_TYPES,
    QuantHieraAttention,
    QuantRoPEAttention,
    QuantSam2Attention,
)
from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides

ATOL = 2e-5
SIZE = 128


def small_sam2(size: str = "t", video: bool = False, seed: int = 0) -> nn.Module:
    """A reduced SAM 2.1 whose zero-initialised positional embeddings are randomised too."""
    torch.manual_seed(seed)
    model = build_sam2_model(size, reduced_overrides(image_size=SIZE), video=video)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name or "no_mem" in name or "maskmem_tpos" in name:
                p.normal_(0.0, 0.5)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


class ExplicitIdentity(IdentitySlot):
    """An identity probability slot; unlike an empty slot it makes the twin compute the probabilities."""


def explicit(model: nn.Module) -> nn.Module:
    """Every twin of ``model`` on the explicit attention path, still computing in float."""
    for module in model.modules():
        if isinstance(module, SAM2_TWIN_TYPES):
            module.set_quantizer("prob", ExplicitIdentity())
    return model


class Coarse(IdentitySlot):
    """A visible stand-in for a quantizer: rounds to a coarse grid."""

    def forward(self, x: torch.Tensor, **ctx) -> torch.Tensor:
        return torch.round(x * 4) / 4


@pytest.mark.parametrize("size", ["t", "s"])
def test_image_encoder_trunk_and_neck_match_upstream(size: str) -> None:
    model = small_sam2(size)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.image_encoder(x)
        prepare_sam2(model)
        out = model.image_encoder(x)
        explicit_out = explicit(model).image_encoder(x)
    assert isinstance(model.image_encoder.trunk.blocks[1].attn, QuantHieraAttention)  # a q-pooling block
    for a, b, c in zip(ref["backbone_fpn"], out["backbone_fpn"], explicit_out["backbone_fpn"]):
        assert torch.equal(a, b)
        assert a.shape == c.shape and max_diff(a, c) < ATOL
    for a, b in zip(ref["vision_pos_enc"], explicit_out["vision_pos_enc"]):
        assert torch.equal(a, b)


def memory_inputs(model: nn.Module, n_frames: int = 3, n_ptr: int = 4, batch: int = 2) -> dict:
    """Current-frame tokens and memories of ``n_frames`` frames plus ``n_ptr`` object-pointer tokens."""
    g = torch.Generator().manual_seed(5)
    tokens = (SIZE // 16) ** 2
    d, mem = model.memory_attention.d_model, model.memory_encoder.out_proj.out_channels
    n_mem = tokens * n_frames + n_ptr
    return dict(
        curr=torch.randn(tokens, batch, d, generator=g),
        curr_pos=torch.randn(tokens, batch, d, generator=g),
        memory=torch.randn(n_mem, batch, mem, generator=g),
        memory_pos=torch.randn(n_mem, batch, mem, generator=g),
        num_obj_ptr_tokens=n_ptr,
    )


def test_memory_attention_with_memories_and_pointers_matches_upstream() -> None:
    model = small_sam2()
    inputs = memory_inputs(model)
    with torch.no_grad():
        ref = model.memory_attention(**inputs)
        prepare_sam2(model)
        out = model.memory_attention(**inputs)
        explicit_out = explicit(model).memory_attention(**inputs)
    assert isinstance(model.memory_attention.layers[0].cross_attn_image, QuantRoPEAttention)
    assert torch.equal(ref, out)
    assert max_diff(ref, explicit_out) < ATOL


def test_rope_twin_excludes_pointer_tokens_and_quantizes_after_rope() -> None:
    model = small_sam2()
    attn = model.memory_attention.layers[0].cross_attn_image
    g = torch.Generator().manual_seed(2)
    tokens, n_ptr = (SIZE // 16) ** 2, 4
    q = torch.randn(1, tokens, attn.embedding_dim, generator=g)
    kv = torch.randn(1, 2 * tokens + n_ptr, attn.kv_in_dim, generator=g)
    twin = QuantRoPEAttention(attn).eval()
    seen: dict[str, torch.Tensor] = {}

    class Keep(IdentitySlot):
        def forward(self, x: torch.Tensor, **ctx) -> torch.Tensor:
            seen["k"] = x.clone()
            return x

    twin.set_quantizer("k", Keep())
    with torch.no_grad():
        ref = attn(q, kv.clone(), kv, num_k_exclude_rope=n_ptr)
        out = twin(q, kv.clone(), kv, num_k_exclude_rope=n_ptr)
        k_raw = twin._heads(twin.k_proj(kv))
    assert torch.equal(ref, out)
    # the k slot sees rotated memory keys and untouched pointer keys
    assert torch.equal(seen["k"][:, :, -n_ptr:], k_raw[:, :, -n_ptr:])
    assert not torch.allclose(seen["k"][:, :, :-n_ptr], k_raw[:, :, :-n_ptr])


def test_memory_encoder_matches_upstream_exactly() -> None:
    model = small_sam2()
    g = torch.Generator().manual_seed(3)
    pix = torch.randn(2, model.memory_attention.d_model, SIZE // 16, SIZE // 16, generator=g)
    masks = torch.randn(2, 1, SIZE, SIZE, generator=g)
    with torch.no_grad():
        ref = model.memory_encoder(pix, masks)
        prepare_sam2(model)
        out = model.memory_encoder(pix, masks)
    assert torch.equal(ref["vision_features"], out["vision_features"])


def decoder_inputs(model: nn.Module, n_boxes: int = 3) -> dict:
    g = torch.Generator().manual_seed(4)
    d, grid = model.sam_prompt_encoder.embed_dim, model.sam_image_embedding_size
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 127.0, 127.0], [40.0, 8.0, 70.0, 60.0]])
    sparse, dense = model.sam_prompt_encoder(points=None, boxes=boxes[:n_boxes], masks=None)
    return dict(
        image_embeddings=torch.randn(1, d, grid, grid, generator=g),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        repeat_image=True,
        high_res_features=[
            torch.randn(1, d // 8, grid * 4, grid * 4, generator=g),
            torch.randn(1, d // 4, grid * 2, grid * 2, generator=g),
        ],
    )


def test_mask_decoder_matches_upstream() -> None:
    model = small_sam2()
    with torch.no_grad():
        inputs = decoder_inputs(model)
        ref = model.sam_mask_decoder(**inputs)
        prepare_sam2(model)
        out = model.sam_mask_decoder(**inputs)
        explicit_out = explicit(model).sam_mask_decoder(**inputs)
    assert isinstance(model.sam_mask_decoder.transformer.final_attn_token_to_image, QuantSam2Attention)
    for a, b, c in zip(ref, out, explicit_out):
        assert torch.equal(a, b)
        assert a.shape == c.shape and max_diff(a, c) < ATOL


def write_clip(folder, n_frames: int = 4) -> None:
    """A moving bright rectangle on noise, as ``<index>.jpg`` frames (the predictor's folder layout)."""
    rng = np.random.default_rng(0)
    for i in range(n_frames):
        frame = (rng.random((96, 128, 3)) * 60).astype(np.uint8)
        frame[20 + 4 * i: 60 + 4 * i, 30 + 6 * i: 80 + 6 * i] = 200
        Image.fromarray(frame).save(folder / f"{i}.jpg")


def track(predictor: nn.Module, folder) -> dict[int, torch.Tensor]:
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sam2 warns once per frame that its CUDA hole filling is absent
        state = predictor.init_state(str(folder))
        box = np.array([30, 20, 80, 60], dtype=np.float32)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=box)
        return {f: logits.clone() for f, _, logits in predictor.propagate_in_video(state)}


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def test_video_predictor_masks_match_upstream(tmp_path) -> None:
    write_clip(tmp_path)
    predictor = small_sam2(video=True)
    ref = track(predictor, tmp_path)
    prepare_sam2(predictor)
    out = track(predictor, tmp_path)
    assert sorted(out) == sorted(ref) == [0, 1, 2, 3]
    assert all(torch.equal(ref[frame], out[frame]) for frame in ref)
    cross = explicit(predictor).memory_attention.layers[0].cross_attn_image
    recorder = Recorder()
    cross.set_quantizer("k", recorder)
    out = track(predictor, tmp_path)
    for frame in ref:
        assert max_diff(ref[frame], out[frame]) < ATOL
        assert iou(ref[frame] > 0, out[frame] > 0) >= 0.999
    # memories were attended with object-pointer tokens: keys = 64 per memory frame + pointer tokens
    keys = [shape[2] for shape, _ in recorder.seen]
    assert keys and any(k % (SIZE // 16) ** 2 for k in keys)


def test_prepare_swaps_exactly_the_attentions_and_shares_parameters() -> None:
    model = small_sam2()
    originals = dict(model.named_modules())
    params_before = dict(model.named_parameters())
    upstream = [n for n, m in originals.items() if isinstance(m, (MultiScaleAttention, Attention))]
    prepare_sam2(model)
    modules = dict(model.named_modules())
    assert len(upstream) == 12 + 4 * 2 + 7
    for name in upstream:
        twin = modules[name]
        assert type(twin) in (QuantHieraAttention, QuantRoPEAttention, QuantSam2Attention), name
        assert isinstance(twin, type(originals[name]))  # sam2 dispatches on isinstance
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    q_proj = "memory_attention.layers.1.self_attn.q_proj"
    assert modules[q_proj] is originals[q_proj]
    assert prepare_sam2(model) is model and dict(model.named_modules()).keys() == modules.keys()


def test_keep_float_leaves_upstream_attentions_and_rejects_other_models() -> None:
    model = small_sam2()
    prepare_sam2(model, keep_float=("memory_attention", "sam_mask_decoder"))
    assert type(model.memory_attention.layers[0].self_attn) is RoPEAttention
    assert type(model.sam_mask_decoder.transformer.layers[0].self_attn) is Attention
    assert isinstance(model.image_encoder.trunk.blocks[0].attn, QuantHieraAttention)
    with pytest.raises(TypeError, match="expects a sam2 SAM2Base"):
        prepare_sam2(model.image_encoder)
    with pytest.raises(TypeError, match="not the string"):
        prepare_sam2(model, keep_float="sam_mask_decoder")


def test_slots_sit_where_documented_and_change_the_output() -> None:
    model = prepare_sam2(small_sam2())
    hiera = model.image_encoder.trunk.blocks[1].attn  # q-pooling block: 32x32 -> 16x16 queries, window 8 -> 4
    recorders = {slot: Recorder() for slot in ("q", "k", "v", "prob")}
    for slot, rec in recorders.items():
        hiera.set_quantizer(slot, rec)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.image_encoder(x)["vision_features"]
    n_windows, heads, dim = 16, hiera.num_heads, hiera.dim_out // hiera.num_heads
    assert recorders["q"].seen == [((n_windows, heads, 16, dim), ())]
    assert recorders["k"].seen == [((n_windows, heads, 64, dim), ())]
    assert recorders["prob"].seen == [((n_windows, heads, 16, 64), ("value",))]
    hiera.set_quantizer("prob", Coarse())
    with torch.no_grad():
        coarse = model.image_encoder(x)["vision_features"]
    assert max_diff(ref, coarse) > 1e-3
    with pytest.raises(KeyError, match="no slot 'x'"):
        hiera.set_quantizer("x", Recorder())
    dec = model.sam_mask_decoder.transformer.layers[0].cross_attn_token_to_image
    dec.set_quantizer("k", (rec := Recorder()))
    with torch.no_grad():
        model.sam_mask_decoder(**decoder_inputs(model, n_boxes=2))
    # k before the head split: 2 prompts x 64 image tokens x internal dim (d_model / 2)
    assert rec.seen == [((2, 64, dec.internal_dim), ())]
