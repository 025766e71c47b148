"""build_sam / load_sam against segment_anything's own builders and the official checkpoint layout.

Full-size state dicts are written with stride-0 tensors (one stored number per tensor, expanded to the real
shape), so a file has the exact keys and shapes of an official checkpoint but takes a few kilobytes.
"""
from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from ahcq.models import build_sam, infer_model_type, load_sam

OFFICIAL_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
SMALL_H = dict(img_size=224, embed_dim=32, prompt_embed_dim=64, decoder_mlp_dim=128, iou_head_hidden_dim=64)


def official_shapes(model_type: str) -> dict[str, torch.Size]:
    """Key -> shape of segment_anything's own build of ``model_type`` (on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in sam_model_registry[model_type]().state_dict().items()}


def tiny_official_file(tmp_path, model_type: str) -> tuple[str, dict[str, float]]:
    """An official-layout state dict file; each tensor is filled with its own index."""
    shapes = official_shapes(model_type)
    values = {k: float(i) for i, k in enumerate(shapes)}
    path = tmp_path / OFFICIAL_FILES[model_type]
    torch.save({k: torch.full((), values[k]).expand(shape) for k, shape in shapes.items()}, path)
    return str(path), values


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_build_sam_matches_segment_anything_builders(model_type: str) -> None:
    with torch.device("meta"):
        ours = {k: v.shape for k, v in build_sam(model_type).state_dict().items()}
        ours_state = build_sam(model_type).state_dict()
    assert list(ours) == list(official_shapes(model_type))
    assert ours == official_shapes(model_type)
    assert infer_model_type(ours_state) == model_type


def test_load_full_size_vit_b_checkpoint_infers_type_and_loads_every_tensor(tmp_path) -> None:
    path, values = tiny_official_file(tmp_path, "vit_b")
    sam = load_sam(None, path)
    state = sam.state_dict()
    assert state.keys() == values.keys()
    assert all(bool((state[k] == v).all()) for k, v in values.items())
    assert not sam.training


def test_wrong_model_type_names_expected_and_found(tmp_path) -> None:
    path, _ = tiny_official_file(tmp_path, "vit_l")
    message = (
        "checkpoint sam_vit_l_0b3195.pth holds a vit_l model (embed_dim 1024, 24 blocks) "
        "but model_type vit_b was requested (embed_dim 768, 12 blocks)"
    )
    with pytest.raises(ValueError) as err:
        load_sam("vit_b", path)
    assert str(err.value) == message


def test_small_round_trip_is_exact(tmp_path) -> None:
    torch.manual_seed(0)
    sam = build_sam("vit_h", **SMALL_H)
    path = tmp_path / "small_vit_h.pth"
    torch.save(sam.state_dict(), path)
    loaded = load_sam("vit_h", path, **SMALL_H)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(image), sam.image_encoder(image))
    with pytest.raises(ValueError, match=r"holds an unrecognised model \(embed_dim 32, 32 blocks\)"):
        load_sam("vit_h", path)


def test_bad_files_get_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_sam("vit_b", tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pth could not be read as a torch state dict"):
        load_sam("vit_b", garbage)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="list.pth is not a state dict"):
        load_sam("vit_b", listed)
    unrelated = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, unrelated)
    with pytest.raises(ValueError, match="resnet.pth is not a SAM state dict: no 4-D tensor"):
        load_sam(None, unrelated)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 3}, wrapped)
    with pytest.raises(ValueError, match="wrapped.pth is not a plain state dict: non-tensor entry 'model'"):
        load_sam("vit_b", wrapped)


def test_missing_keys_and_bad_arguments(tmp_path) -> None:
    torch.manual_seed(0)
    state = build_sam("vit_h", **SMALL_H).state_dict()
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    missing = r"(?s)partial.pth does not match a vit_h SAM: .*Missing key.*iou_token.weight"
    with pytest.raises(ValueError, match=missing):
        load_sam("vit_h", path, **SMALL_H)
    with pytest.raises(ValueError, match="unknown SAM model_type 'vit_x'"):
        load_sam("vit_x", path)
    with pytest.raises(TypeError, match=r"unknown SAM size override\(s\) \['image_size'\]"):
        build_sam("vit_b", image_size=512)
