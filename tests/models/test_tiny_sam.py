"""The small SAM is made of segment_anything's own modules and runs box-prompted inference."""
import pytest
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention as EncoderAttention

from ahcq.models.tiny_sam import build_tiny_sam


@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.manual_seed(0)
    return build_tiny_sam()


def test_structure_has_windowed_padded_and_global_blocks(sam: Sam) -> None:
    enc = sam.image_encoder
    grid = enc.img_size // enc.patch_embed.proj.kernel_size[0]
    windows = [b.window_size for b in enc.blocks]
    assert 0 in windows and any(w > 0 for w in windows)
    assert all(grid % w for w in windows if w > 0), "windowed blocks should exercise padding"
    assert all(isinstance(b.attn, EncoderAttention) and b.attn.use_rel_pos for b in enc.blocks)
    assert sam.mask_decoder.num_mask_tokens == 4
    n_params = sum(p.numel() for p in sam.parameters())
    assert 1.5e6 < n_params < 2.6e6, n_params  # fp32 state dict must stay under 10 MB


def test_state_dict_uses_official_sam_key_layout(sam: Sam) -> None:
    keys = set(sam.state_dict())
    for key in ("image_encoder.blocks.0.attn.qkv.weight", "image_encoder.blocks.0.attn.rel_pos_h",
                "image_encoder.neck.2.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight",
                "mask_decoder.iou_prediction_head.layers.2.weight"):
        assert key in keys, key


def test_box_prompted_forward_shapes(sam: Sam) -> None:
    img = torch.randint(0, 256, (3, 128, 128)).float()
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 50.0, 120.0, 127.0], [60.0, 60.0, 66.0, 64.0]])
    with torch.inference_mode():
        out = sam([{"image": img, "original_size": (128, 128), "boxes": boxes}], multimask_output=False)[0]
    assert out["masks"].shape == (3, 1, 128, 128) and out["masks"].dtype == torch.bool
    assert out["iou_predictions"].shape == (3, 1)
    assert out["low_res_logits"].shape == (3, 1, 64, 64)
    assert torch.isfinite(out["low_res_logits"]).all()


def test_checkpoint_round_trip_is_exact(tmp_path, sam: Sam) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    assert path.stat().st_size < 10e6  # fp32 storage of the default size fits the 10 MB limit
    torch.manual_seed(1)
    other = build_tiny_sam(checkpoint=path)
    for (name, a), b in zip(sam.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        assert torch.equal(sam.image_encoder(x), other.image_encoder(x))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple"):
        build_tiny_sam(img_size=100, patch_size=8)
    with pytest.raises(ValueError, match="global_attn_indexes"):
        build_tiny_sam(depth=2, global_attn_indexes=(3,))


def test_pos_embed_starts_as_a_seed_independent_position_code() -> None:
    torch.manual_seed(5)
    a = build_tiny_sam().image_encoder.pos_embed
    torch.manual_seed(6)
    b = build_tiny_sam().image_encoder.pos_embed
    assert torch.equal(a, b)
    flat = a[0].reshape(-1, a.shape[-1])
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e3).min() > 0.1  # positions all distinct
