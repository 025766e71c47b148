"""Oracle prompts: the dataset's ground-truth boxes, score 1, to measure SAM's masks alone."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..registry import PROMPT_SOURCES
from .base import Prompts, PromptSource, as_file_list, category_ids, image_id_of, load_json

__all__ = ["GTBoxPrompt"]

Key = int | str


def _kept(ann: dict) -> bool:
    """Whether mmdet keeps an annotation as a ground-truth box (not crowd or ignored, positive size)."""
    _, _, w, h = ann["bbox"]
    return not (
        ann.get("iscrowd", 0) or ann.get("ignore", False) or ann.get("area", 1) <= 0 or w < 1 or h < 1
    )


@PROMPT_SOURCES.register_module()
class GTBoxPrompt(PromptSource):
    """Ground-truth boxes from COCO annotation files.

    Args:
        ann_file: one COCO instances json or several (e.g. val and train, so that calibration images
            drawn from train are found too).
        img_prefix: ``None`` finds images by id (ids must be unique across the files, as in COCO);
            otherwise one image folder per ann_file, and images are found by path (for sets whose
            splits reuse ids, such as the generated demo set).
        classes: the dataset's class names (label order); ``None`` means the 80 COCO classes.

    Kept, as mmdet keeps them as ground truth: annotations that are not crowd or ignored, have positive
    area, width and height >= 1 and a category among ``classes``.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike | Sequence[str],
        img_prefix: str | Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.files = as_file_list(ann_file, "ann_file")
        prefixes = [img_prefix] if isinstance(img_prefix, str) else img_prefix
        if prefixes is not None and len(prefixes) != len(self.files):
            raise ValueError(f"img_prefix has {len(prefixes)} entries for {len(self.files)} ann_file(s)")
        self.by_path = prefixes is not None
        label_of = {cat_id: i for i, cat_id in enumerate(category_ids(self.files[0], classes))}
        self._boxes: dict[Key, list[tuple[list[float], int]]] = {}
        for i, path in enumerate(self.files):
            data = load_json(path, "ann_file")
            key_of = {}
            for image in data.get("images", []):
                key = (
                    os.path.normpath(os.path.join(prefixes[i], image["file_name"]))
                    if prefixes
                    else image["id"]
                )
                if key in self._boxes:
                    raise ValueError(f"ann_file {path!r}: image {key!r} is also in an earlier file")
                key_of[image["id"]] = key
                self._boxes[key] = []
            for ann in data.get("annotations", []):
                if not _kept(ann) or ann["category_id"] not in label_of:
                    continue
                if ann["image_id"] not in key_of:
                    raise ValueError(f"ann_file {path!r}: annotation {ann.get('id')} names an unknown image")
                x, y, w, h = (float(v) for v in ann["bbox"])
                self._boxes[key_of[ann["image_id"]]].append(
                    ([x, y, x + w, y + h], label_of[ann["category_id"]])
                )

    def forward(self, image_bgr: np.ndarray, img_meta: dict) -> Prompts:
        """All kept ground-truth boxes of the image, in annotation order, with score 1."""
        key = os.path.normpath(img_meta["filename"]) if self.by_path else image_id_of(img_meta)
        if key not in self._boxes:
            raise KeyError(f"image {key!r} is in none of the ann_file(s) {self.files}")
        anns = self._boxes[key]
        return Prompts.from_arrays([a[0] for a in anns], np.ones(len(anns)), [a[1] for a in anns])
