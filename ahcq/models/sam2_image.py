"""SAM2 on single images with box prompts, as sam2's ``SAM2ImagePredictor`` runs it, split into the steps
the COCO pipeline caches separately (the counterparts of ``sam_runner`` for a ``SAM2Base``).

``prepare_sam2_image`` is sam2's own ``SAM2Transforms`` (square resize, ImageNet normalisation);
``encode_sam2`` the image encoder, the backbone-feature preparation and the no-memory embedding that
``set_image`` adds; ``decode_sam2_boxes`` the prompt encoder (boxes as two corner points), the mask decoder
with the high-resolution features and ``postprocess_masks``. The predictor's fixed feature sizes (those of
1024 px) are read from the backbone instead, so reduced builds run too. Memory attention and the memory
encoder never run on an image: ``IMAGE_KEEP_FLOAT`` keeps them float so the PTQ recipe leaves them alone.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms

from ahcq.models.sam2 import DEFAULT_KEEP_FLOAT
from ahcq.models.sam_runner import SamImage, no_masks

__all__ = ["IMAGE_KEEP_FLOAT", "MASK_THRESHOLD", "Sam2Features", "decode_sam2_boxes", "encode_sam2",
           "prepare_sam2_image"]

IMAGE_KEEP_FLOAT: tuple[str, ...] = (*DEFAULT_KEEP_FLOAT, "memory_attention", "memory_encoder")
MASK_THRESHOLD = 0.0  # SAM2ImagePredictor's default


class Sam2Features(NamedTuple):
    """What the mask decoder reads of one image: the lowest-resolution embedding and the finer levels."""

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, ...]


def _transforms(model: SAM2Base) -> SAM2Transforms:
    return SAM2Transforms(resolution=model.image_size, mask_threshold=MASK_THRESHOLD)


def prepare_sam2_image(model: SAM2Base, image_rgb: np.ndarray) -> SamImage:
    """HxWx3 uint8 RGB image -> (1, 3, S, S) encoder input, as ``SAM2ImagePredictor.set_image``."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.dtype} of shape "
                         f"{image_rgb.shape}")
    tensor = _transforms(model)(image_rgb)[None].to(model.device)
    side = int(model.image_size)
    return SamImage(tensor=tensor, input_size=(side, side),
                    original_size=(int(image_rgb.shape[0]), int(image_rgb.shape[1])))


@torch.no_grad()
def encode_sam2(model: SAM2Base, image: SamImage) -> Sam2Features:
    """The decoder's inputs of a prepared image (``set_image`` without the predictor's state)."""
    backbone_out = model.forward_image(image.tensor.to(model.device))
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [f.permute(1, 2, 0).reshape(1, -1, *size) for f, size in zip(vision_feats, feat_sizes)]
    return Sam2Features(feats[-1], tuple(feats[:-1]))


@torch.no_grad()
def decode_sam2_boxes(model: SAM2Base, features: Sam2Features, image: SamImage, boxes: torch.Tensor,
                      box_chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (N, H, W) bool at the original size and predicted IoU (N,) of xyxy boxes in original pixels,
    one mask per box (``multimask_output=False``), ``box_chunk`` boxes at a time."""
    empty = no_masks(image, boxes, box_chunk)
    if empty is not None:
        return empty
    device = model.device
    transforms = _transforms(model)
    dense_pe = model.sam_prompt_encoder.get_dense_pe()
    masks, ious = [], []
    for chunk in torch.split(boxes.to(device, torch.float32), box_chunk):
        corners = transforms.transform_boxes(chunk, normalize=True, orig_hw=image.original_size)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(len(chunk), 1)
        sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=features.image_embed.to(device),
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=len(chunk) > 1,
            high_res_features=[f.to(device) for f in features.high_res_feats],
        )
        logits = transforms.postprocess_masks(low_res, image.original_size)
        masks.append((logits[:, 0] > MASK_THRESHOLD).cpu())
        ious.append(iou[:, 0].float().cpu())
    return torch.cat(masks), torch.cat(ious)
