"""SAM from box prompts, checked against segment_anything's own SamPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from ahcq.models.sam_runner import decode_boxes, encode, prepare_image

BOXES = torch.tensor(
    [[5.0, 5.0, 60.0, 40.0], [20.0, 30.0, 130.0, 85.5], [0.0, 0.0, 140.0, 90.0], [50, 10, 70, 80]]
)


@pytest.fixture
def image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)


def test_matches_sam_predictor(sam, image):
    prepared = prepare_image(sam, image)
    embedding = encode(sam, prepared)
    masks, iou = decode_boxes(sam, embedding, prepared, BOXES)

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    ref_masks, ref_iou, _ = predictor.predict_torch(
        None,
        None,
        boxes=predictor.transform.apply_boxes_torch(BOXES, image.shape[:2]),
        multimask_output=False,
    )
    assert torch.equal(embedding, predictor.features)
    assert masks.shape == (4, 90, 140) and masks.dtype == torch.bool
    assert torch.equal(masks, ref_masks[:, 0])
    assert torch.equal(iou, ref_iou[:, 0])


def test_chunking_gives_identical_masks(sam, image):
    prepared = prepare_image(sam, image)
    embedding = encode(sam, prepared)
    masks_2, iou_2 = decode_boxes(sam, embedding, prepared, BOXES, box_chunk=2)
    masks_64, iou_64 = decode_boxes(sam, embedding, prepared, BOXES, box_chunk=64)
    assert 0 < masks_2.float().mean() < 1
    assert torch.equal(masks_2, masks_64)
    torch.testing.assert_close(iou_2, iou_64)


def test_no_boxes_gives_empty_masks_of_the_image_size(sam, image):
    prepared = prepare_image(sam, image)
    masks, iou = decode_boxes(sam, encode(sam, prepared), prepared, torch.zeros((0, 4)))
    assert masks.shape == (0, 90, 140) and iou.shape == (0,)


def test_bad_inputs_are_named(sam, image):
    with pytest.raises(ValueError, match="uint8 RGB"):
        prepare_image(sam, image.astype(np.float32))
    prepared = prepare_image(sam, image)
    with pytest.raises(ValueError, match="box_chunk"):
        decode_boxes(sam, encode(sam, prepared), prepared, BOXES, box_chunk=0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        decode_boxes(sam, encode(sam, prepared), prepared, BOXES[:, :3])
