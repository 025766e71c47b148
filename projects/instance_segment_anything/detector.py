"""``DetWrapperInstanceSAM``: an mmdet 2.x detector whose masks come from SAM prompted with boxes.

The work is split so that a quantization pipeline can cache what never changes: ``prepare`` runs the
prompt source once and gives SAM's encoder input plus the boxes; ``predict_cached`` runs SAM from those
(optionally from a cached image embedding). ``simple_test``, which mmdet's test loop calls, does both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mmdet.models.builder import DETECTORS
from mmdet.models.detectors.base import BaseDetector
from sam2.modeling.sam2_base import SAM2Base
from segment_anything.modeling import Sam

from ahcq.models.image_runner import Embedding, decode_boxes, encode, prepare_image
from ahcq.models.sam2_image import Sam2Features
from ahcq.models.sam_runner import SamSample

from .prompts import PromptSource
from .registry import PROMPT_SOURCES, SAM_BUILDERS
from .results import to_mmdet_results

__all__ = ["DetWrapperInstanceSAM", "SamSample"]

MmdetResult = tuple[list[np.ndarray], list[list[np.ndarray]]]


def _loaded_images(img: torch.Tensor, img_metas: list[dict]) -> list[np.ndarray]:
    """Undo the test pipeline's normalisation: the loaded images, HxWx3 uint8 BGR, at their original size."""
    images = []
    for x, meta in zip(img, img_metas):
        h, w = meta["img_shape"][:2]
        if (h, w) != tuple(meta["ori_shape"][:2]):
            raise ValueError(
                f"image {meta.get('ori_filename')} was resized by the test pipeline "
                f"({meta['ori_shape'][:2]} -> {(h, w)}); SAM resizes it itself: use the pipeline of "
                "projects/configs/_base_/coco_instance_sam.py"
            )
        norm = meta.get("img_norm_cfg")
        if norm is None:
            raise KeyError("img_metas lack 'img_norm_cfg'; the test pipeline needs a Normalize step")
        pixels = x[:, :h, :w].permute(1, 2, 0).detach().cpu().double().numpy()
        pixels = np.clip(np.rint(pixels * norm["std"] + norm["mean"]), 0, 255).astype(np.uint8)
        images.append(np.ascontiguousarray(pixels[..., ::-1] if norm["to_rgb"] else pixels))
    return images


def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_bgr[..., ::-1])


@DETECTORS.register_module()
class DetWrapperInstanceSAM(BaseDetector):
    """Instance segmentation by SAM (or SAM2) from box prompts (post-training quantization target:
    ``self.sam``).

    Args:
        sam: a ``segment_anything`` ``Sam`` or a sam2 ``SAM2Base``, or a config of a builder in
            ``SAM_BUILDERS`` (``OfficialSAM``, ``TinySAM``, ``RandomSAM``, ``OfficialSAM2``, ``TinySAM2``).
        prompt: a ``PromptSource`` or a config of one in ``PROMPT_SOURCES``
            (``MMDetPrompt``, ``DetectionFilePrompt``, ``GTBoxPrompt``).
        num_classes: classes of the dataset (length of the per-class result lists).
        box_chunk: boxes decoded at once; bounds decoder memory for images with hundreds of prompts.
        use_box_score: mask score = SAM's predicted IoU times the box score (else the IoU alone).
        train_cfg, test_cfg, pretrained, init_cfg: passed by mmdet's builders; unused (nothing is trained).
    """

    def __init__(
        self,
        sam: Sam | SAM2Base | dict,
        prompt: PromptSource | dict,
        num_classes: int = 80,
        box_chunk: int = 32,
        use_box_score: bool = True,
        train_cfg: Any = None,
        test_cfg: Any = None,
        pretrained: Any = None,
        init_cfg: Any = None,
    ) -> None:
        super().__init__(init_cfg)
        if box_chunk < 1:
            raise ValueError(f"box_chunk must be >= 1, got {box_chunk}")
        self.sam = sam if isinstance(sam, (Sam, SAM2Base)) else SAM_BUILDERS.build(sam)
        if not isinstance(self.sam, (Sam, SAM2Base)):
            raise TypeError(f"sam builder {sam.get('type')!r} returned {type(self.sam).__name__}, not a Sam "
                            "or SAM2Base")
        self.prompt = prompt if isinstance(prompt, PromptSource) else PROMPT_SOURCES.build(prompt)
        self.num_classes = num_classes
        self.box_chunk = box_chunk
        self.use_box_score = use_box_score

    def prepare(self, img: torch.Tensor, img_metas: list[dict]) -> list[SamSample]:
        """Per image of the batch: SAM's encoder input and the prompts (boxes clipped to the image).

        This is the only place the prompt source (e.g. a detector) runs: cache the result to never rerun it.
        """
        samples = []
        for image_bgr, meta in zip(_loaded_images(img, img_metas), img_metas):
            prompts = self.prompt(image_bgr, meta).clip(*image_bgr.shape[:2])
            samples.append(SamSample(prepare_image(self.sam, _rgb(image_bgr)), prompts))
        return samples

    def extract_feat(self, img: torch.Tensor, img_metas: list[dict] | None = None) -> torch.Tensor:
        """Image embeddings (B, C, h, w) of a batch from the test pipeline (no prompts are computed); for
        SAM2 the lowest-resolution level, the one its decoder attends to."""
        if img_metas is None:
            raise ValueError(
                "DetWrapperInstanceSAM.extract_feat needs img_metas to undo the pipeline normalisation"
            )
        images = _loaded_images(img, img_metas)
        embeddings = [encode(self.sam, prepare_image(self.sam, _rgb(image))) for image in images]
        return torch.cat([e.image_embed if isinstance(e, Sam2Features) else e for e in embeddings])

    @torch.no_grad()
    def predict_cached(self, sample: SamSample, embedding: Embedding | None = None) -> MmdetResult:
        """mmdet results of one image from its cached sample (and image embedding, computed if not given)."""
        if embedding is None:
            embedding = encode(self.sam, sample.image)
        prompts = sample.prompts
        masks, iou = decode_boxes(self.sam, embedding, sample.image, prompts.boxes, self.box_chunk)
        scores = iou * prompts.scores if self.use_box_score else iou
        return to_mmdet_results(prompts.boxes, scores, prompts.labels, masks, self.num_classes)

    def simple_test(
        self, img: torch.Tensor, img_metas: list[dict], rescale: bool = True, **kwargs: Any
    ) -> list:
        """Results in original image pixels (``rescale`` is kept for mmdet's API: SAM always rescales)."""
        return [self.predict_cached(sample) for sample in self.prepare(img, img_metas)]

    def aug_test(self, imgs: list, img_metas: list, **kwargs: Any) -> list:
        """Test-time augmentation has no meaning for box-prompted SAM."""
        raise NotImplementedError("DetWrapperInstanceSAM does not support test-time augmentation")

    def forward_train(self, img: torch.Tensor, img_metas: list[dict], **kwargs: Any) -> dict:
        """Post-training quantization only: nothing here is trained through mmdet."""
        raise NotImplementedError("DetWrapperInstanceSAM is inference-only")
