"""Box-prompted segmentation of one image by SAM or SAM2, one entry per cached step, chosen by the model's
family: the COCO pipeline and the detector wrapper call these and run either model unchanged.

``Embedding`` is what ``encode`` gives and ``decode_boxes`` reads: SAM's image embedding, or SAM2's
``Sam2Features`` (its embedding plus the high-resolution levels).
"""
from __future__ import annotations

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from segment_anything.modeling import Sam

from ahcq.models import sam2_image, sam_runner
from ahcq.models.sam2_image import Sam2Features
from ahcq.models.sam_runner import SamImage

__all__ = ["Embedding", "PromptedModel", "decode_boxes", "encode", "input_side", "is_sam2", "prepare_image"]

PromptedModel = Sam | SAM2Base
Embedding = torch.Tensor | Sam2Features


def is_sam2(model: PromptedModel) -> bool:
    """Whether ``model`` is a sam2 model (else a segment_anything ``Sam``)."""
    return isinstance(model, SAM2Base)


def input_side(model: PromptedModel) -> int:
    """The square side of the encoder input."""
    return int(model.image_size) if is_sam2(model) else int(model.image_encoder.img_size)


def prepare_image(model: PromptedModel, image_rgb: np.ndarray) -> SamImage:
    """HxWx3 uint8 RGB image -> the encoder input and the sizes needed to map masks back."""
    if is_sam2(model):
        return sam2_image.prepare_sam2_image(model, image_rgb)
    return sam_runner.prepare_image(model, image_rgb)


def encode(model: PromptedModel, image: SamImage) -> Embedding:
    """What the mask decoder reads of a prepared image."""
    return sam2_image.encode_sam2(model, image) if is_sam2(model) else sam_runner.encode(model, image)


def decode_boxes(model: PromptedModel, embedding: Embedding, image: SamImage, boxes: torch.Tensor,
                 box_chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (N, H, W) bool at the original size and predicted IoU (N,) of xyxy boxes in original pixels."""
    if is_sam2(model):
        return sam2_image.decode_sam2_boxes(model, embedding, image, boxes, box_chunk)
    return sam_runner.decode_boxes(model, embedding, image, boxes, box_chunk)
