"""SAM2 on box-prompted images (``ahcq.models.sam2_image``) against sam2's own ``SAM2ImagePredictor``,
on a reduced SAM 2.1 Hiera-T with random weights; and the builders that give the COCO wrapper a SAM2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sam2.sam2_image_predictor import SAM2ImagePredictor

from ahcq.models import image_runner
from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
from ahcq.models.sam2_image import Sam2Features
from projects.instance_segment_anything.sam_builders import OfficialSAM2, TinySAM2

REDUCED = dict(image_size=64, embed_dim=16, d_model=32, mem_dim=16, ffn_dim=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam2_model("t", reduced_overrides(**REDUCED))


def _predictor(model) -> SAM2ImagePredictor:
    """sam2's predictor with its backbone sizes (fixed for 1024 px) set for the reduced input."""
    predictor = SAM2ImagePredictor(model)
    side = model.image_size
    predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
    return predictor


@pytest.mark.parametrize("count", [1, 3])
def test_box_masks_and_ious_equal_sam2_image_predictor(model, count) -> None:
    rng = np.random.default_rng(count)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # not square: both axes scale differently
    boxes = torch.tensor([[5, 4, 40, 30], [30, 10, 78, 47], [0, 0, 80, 48]][:count], dtype=torch.float32)
    prepared = image_runner.prepare_image(model, image)
    features = image_runner.encode(model, prepared)
    masks, ious = image_runner.decode_boxes(model, features, prepared, boxes, box_chunk=2)

    predictor = _predictor(model)
    predictor.set_image(image)
    ref_masks, ref_ious, _ = predictor.predict(box=boxes.numpy(), multimask_output=False)
    ref_masks = ref_masks.reshape(count, 48, 80)
    assert masks.shape == (count, 48, 80) and masks.dtype == torch.bool
    assert 0 < masks.sum() < masks.numel()
    assert torch.equal(masks, torch.as_tensor(ref_masks).bool())
    torch.testing.assert_close(ious, torch.as_tensor(ref_ious).reshape(count).float(), rtol=1e-5, atol=1e-6)
    assert isinstance(features, Sam2Features)
    assert torch.equal(features.image_embed, predictor._features["image_embed"])


def test_no_boxes_and_bad_inputs(model) -> None:
    image = np.zeros((20, 30, 3), np.uint8)
    prepared = image_runner.prepare_image(model, image)
    masks, ious = image_runner.decode_boxes(model, image_runner.encode(model, prepared), prepared,
                                            torch.zeros((0, 4)))
    assert masks.shape == (0, 20, 30) and ious.shape == (0,)
    with pytest.raises(ValueError, match="uint8 RGB"):
        image_runner.prepare_image(model, image.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        image_runner.decode_boxes(model, image_runner.encode(model, prepared), prepared, torch.zeros(4))
    assert image_runner.input_side(model) == 64 and image_runner.is_sam2(model)


def test_tiny_sam2_builder_reads_its_sizes_from_the_sidecar(model, tmp_path) -> None:
    path = tmp_path / "tiny_sam2.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(FileNotFoundError, match="no json sidecar"):
        TinySAM2(path)
    path.with_suffix(".json").write_text(json.dumps(
        {"model": {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "reduced": REDUCED}}))
    built = TinySAM2(path)
    assert built.image_size == 64
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    path.with_suffix(".json").write_text(json.dumps(
        {"model": {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "reduced": {**REDUCED, "embed_dim": 24}}}))
    with pytest.raises(ValueError, match="embed_dim"):
        TinySAM2(path)
    with pytest.raises(FileNotFoundError, match="no such tiny SAM2 weights"):
        TinySAM2(tmp_path / "missing.pt")


def test_official_sam2_builder_checks_the_file_against_the_size(model, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="sam2.1_hiera_tiny.pt"):
        OfficialSAM2("t", tmp_path / "sam2.1_hiera_tiny.pt")
    path = tmp_path / "reduced.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ValueError, match=r"embed_dim 16.*builds a Hiera-t trunk \(embed_dim 96"):
        OfficialSAM2("t", path)
