"""SAM with box prompts, split into the steps a quantization pipeline needs to cache separately.

``prepare_image`` gives the image-encoder input (cache it once), ``encode`` the image embedding and
``decode_boxes`` the full-resolution masks and SAM's predicted IoU, boxes in chunks so that memory stays
bounded however many prompts an image has. The numpy ``ResizeLongestSide.apply_image`` is used on
purpose: ``apply_image_torch`` in segment-anything 1.0 reads the wrong axes of a BCHW tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

__all__ = ["Prompts", "SamImage", "SamSample", "decode_boxes", "encode", "no_masks", "prepare_image"]


@dataclass
class SamImage:
    """One image as SAM sees it: the padded, normalised encoder input and the two sizes needed to undo it."""

    tensor: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class Prompts:
    """Boxes (N, 4) xyxy float32 in original image pixels, scores (N,) float32, labels (N,) int64 classes."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(
                f"inconsistent prompts: boxes {tuple(self.boxes.shape)}, scores {tuple(self.scores.shape)}, "
                f"labels {tuple(self.labels.shape)}"
            )

    @classmethod
    def from_arrays(cls, boxes: Any, scores: Any, labels: Any) -> Prompts:
        """Build from array-likes, fixing dtypes (an empty input gives a (0, 4) box tensor)."""
        return cls(
            boxes=torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            scores=torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1)),
            labels=torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        )

    def top(self, score_thr: float, max_boxes: int | None) -> Prompts:
        """Boxes with score >= ``score_thr``, best first, at most ``max_boxes`` (stable for ties)."""
        keep = torch.nonzero(self.scores >= score_thr).flatten()
        keep = keep[torch.argsort(self.scores[keep], descending=True, stable=True)]
        if max_boxes is not None:
            keep = keep[:max_boxes]
        return Prompts(self.boxes[keep], self.scores[keep], self.labels[keep])

    def clip(self, height: int, width: int) -> Prompts:
        """Boxes clipped to the image, since SAM's prompt encoder expects boxes inside it."""
        boxes = self.boxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return Prompts(boxes, self.scores, self.labels)


@dataclass
class SamSample:
    """What SAM needs for one image: its encoder input and sizes, and the prompt boxes in original pixels."""

    image: SamImage
    prompts: Prompts


def prepare_image(sam: Sam, image_rgb: np.ndarray) -> SamImage:
    """HxWx3 uint8 RGB image -> (1, 3, S, S) encoder input on SAM's device, as ``SamPredictor.set_image``."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got {image_rgb.dtype} of shape {image_rgb.shape}"
        )
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image_rgb)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    return SamImage(
        tensor=sam.preprocess(x),
        input_size=(int(resized.shape[0]), int(resized.shape[1])),
        original_size=(int(image_rgb.shape[0]), int(image_rgb.shape[1])),
    )


@torch.no_grad()
def encode(sam: Sam, image: SamImage) -> torch.Tensor:
    """Image embedding (1, C, h, w) of a prepared image."""
    return sam.image_encoder(image.tensor.to(sam.device))


def no_masks(image: SamImage, boxes: torch.Tensor,
             box_chunk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Check a decode request; the empty masks and IoUs when there are no boxes, else None."""
    if box_chunk < 1:
        raise ValueError(f"box_chunk must be >= 1, got {box_chunk}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if len(boxes):
        return None
    return torch.zeros((0, *image.original_size), dtype=torch.bool), torch.zeros(0)


@torch.no_grad()
def decode_boxes(
    sam: Sam, embedding: torch.Tensor, image: SamImage, boxes: torch.Tensor, box_chunk: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (N, H, W) bool at the original size and predicted IoU (N,) of xyxy boxes in original pixels.

    Boxes go through the prompt encoder and mask decoder ``box_chunk`` at a time (one mask per box,
    ``multimask_output=False``); the decoder repeats the image embedding per box, so the chunk bounds memory.
    """
    empty = no_masks(image, boxes, box_chunk)
    if empty is not None:
        return empty
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    embedding = embedding.to(sam.device)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    masks, ious = [], []
    for chunk in torch.split(boxes.to(sam.device, torch.float32), box_chunk):
        sparse, dense = sam.prompt_encoder(
            points=None, boxes=transform.apply_boxes_torch(chunk, image.original_size), masks=None
        )
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = sam.postprocess_masks(low_res, image.input_size, image.original_size)
        masks.append((logits[:, 0] > sam.mask_threshold).cpu())
        ious.append(iou[:, 0].float().cpu())
    return torch.cat(masks), torch.cat(ious)
