"""Prompts read from COCO-format detection results: how boxes of H-DETR, DINO or other detectors come in."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..registry import PROMPT_SOURCES
from .base import Prompts, PromptSource, as_file_list, category_ids, image_id_of, load_json

__all__ = ["DetectionFilePrompt"]

_KEYS = ("image_id", "category_id", "bbox", "score")


@PROMPT_SOURCES.register_module()
class DetectionFilePrompt(PromptSource):
    """Boxes from detection-result json: a list of ``{image_id, category_id, bbox [x, y, w, h], score}``.

    Args:
        det_file: one file or several (e.g. val and the train images used for calibration).
        ann_file: the dataset's COCO annotation json, read for its categories only, so that
            ``category_id`` maps to the same label index the dataset evaluates.
        classes: the dataset's class names; ``None`` means the 80 COCO classes.
        score_thr: boxes scoring below are dropped.
        max_boxes: keep at most this many per image, best first (``None``: all).

    An image that is absent from the files has no detections (empty prompts).
    """

    def __init__(
        self,
        det_file: str | os.PathLike | Sequence[str],
        ann_file: str | os.PathLike,
        classes: Sequence[str] | None = None,
        score_thr: float = 0.0,
        max_boxes: int | None = None,
    ) -> None:
        super().__init__()
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        label_of = {
            cat_id: i for i, cat_id in enumerate(category_ids(as_file_list(ann_file, "ann_file")[0], classes))
        }
        self.score_thr = score_thr
        self.max_boxes = max_boxes
        self._dets: dict[int, list[tuple[list[float], float, int]]] = defaultdict(list)
        for path in as_file_list(det_file, "det_file"):
            dets = load_json(path, "det_file")
            if not isinstance(dets, list):
                raise ValueError(
                    f"det_file {path!r} must hold a json list of detections, got {type(dets).__name__}"
                )
            for i, det in enumerate(dets):
                missing = [k for k in _KEYS if k not in det]
                if missing or len(det["bbox"]) != 4:
                    raise ValueError(
                        f"det_file {path!r}, entry {i}: needs {list(_KEYS)} with a 4-number bbox; got {det}"
                    )
                if det["category_id"] not in label_of:
                    raise ValueError(
                        f"det_file {path!r}, entry {i}: category_id {det['category_id']} is not a class"
                    )
                x, y, w, h = (float(v) for v in det["bbox"])
                self._dets[int(det["image_id"])].append(
                    ([x, y, x + w, y + h], float(det["score"]), label_of[det["category_id"]])
                )

    def forward(self, image_bgr: np.ndarray, img_meta: dict) -> Prompts:
        """The image's detections above ``score_thr``, best first, at most ``max_boxes``."""
        dets = self._dets.get(image_id_of(img_meta), [])
        prompts = Prompts.from_arrays([d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets])
        return prompts.top(self.score_thr, self.max_boxes)
