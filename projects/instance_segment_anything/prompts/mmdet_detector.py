"""Prompts from any mmdet 2.x detector, run once per image on the image the data pipeline loaded."""

from __future__ import annotations

import os

import mmcv
import numpy as np
from mmdet.apis import inference_detector, init_detector

from ..registry import PROMPT_SOURCES
from .base import Prompts, PromptSource

__all__ = ["MMDetPrompt"]


@PROMPT_SOURCES.register_module()
class MMDetPrompt(PromptSource):
    """Boxes of an mmdet detector built from its config and weights with mmdet's ``init_detector``.

    Args:
        config: the detector's mmdet config file (or ``mmcv.Config``).
        checkpoint: its weights; ``None`` keeps the random initialisation (for tests and smoke runs).
        score_thr: boxes scoring below are dropped (on top of the detector's own test_cfg).
        max_boxes: keep at most this many per image, best first (``None``: all; YOLOX has no cap of its own).

    The detector's class indices are used as labels, so its classes must be the dataset's.
    """

    def __init__(
        self,
        config: str | os.PathLike | mmcv.Config,
        checkpoint: str | os.PathLike | None = None,
        score_thr: float = 0.05,
        max_boxes: int | None = 100,
    ) -> None:
        super().__init__()
        if not isinstance(config, mmcv.Config) and not os.path.isfile(config):
            raise FileNotFoundError(f"prompt config: no such detector config {os.fspath(config)!r}")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"prompt checkpoint: no such detector weights {os.fspath(checkpoint)!r}")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        config = config if isinstance(config, mmcv.Config) else os.fspath(config)
        self.detector = init_detector(
            config, None if checkpoint is None else os.fspath(checkpoint), device="cpu"
        )
        self.score_thr = score_thr
        self.max_boxes = max_boxes

    def forward(self, image_bgr: np.ndarray, img_meta: dict) -> Prompts:
        """Run the detector on the image (its own test pipeline) and flatten its per-class boxes."""
        result = inference_detector(self.detector, image_bgr)
        per_class = result[0] if isinstance(result, tuple) else result
        boxes = np.concatenate([r[:, :4] for r in per_class])
        scores = np.concatenate([r[:, 4] for r in per_class])
        labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(per_class)])
        return Prompts.from_arrays(boxes, scores, labels).top(self.score_thr, self.max_boxes)
