"""What every prompt source returns, and the COCO bookkeeping the file-based sources share."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from mmdet.datasets import CocoDataset
from torch import nn

from ahcq.models.sam_runner import Prompts

__all__ = ["PromptSource", "Prompts", "as_file_list", "category_ids", "image_id_of", "load_json"]


class PromptSource(nn.Module):
    """Gives the box prompts of one image. An ``nn.Module`` so that a detector inside moves with ``.to()``."""

    def forward(self, image_bgr: np.ndarray, img_meta: dict) -> Prompts:
        """Prompts of the loaded image ``image_bgr`` (HxWx3 uint8 BGR, as mmcv loads it) with ``img_meta``."""
        raise NotImplementedError


def as_file_list(files: str | os.PathLike | Sequence[str | os.PathLike], key: str) -> list[str]:
    """One path or a list of paths -> list of existing paths; a missing file is named in the error."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not paths:
        raise ValueError(f"{key} is empty")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: no such file {os.fspath(path)!r}")
    return [os.fspath(p) for p in paths]


def load_json(path: str, key: str) -> Any:
    """Parse a json file, naming the config key and the file when it is not valid json."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {path!r} is not valid json ({err})") from err


def category_ids(ann_file: str, classes: Sequence[str] | None) -> list[int]:
    """Category ids in label order, as mmdet's ``CocoDataset`` orders them (``classes`` filter, file order).

    Label ``i`` of a prompt is ``category_ids(...)[i]``, so results map back to the same COCO categories
    that the dataset's evaluation writes. ``classes=None`` means the 80 COCO classes, as in mmdet.
    """
    categories = load_json(ann_file, "ann_file").get("categories")
    if not categories:
        raise ValueError(f"ann_file {ann_file!r} has no 'categories'")
    if classes is None:
        classes = CocoDataset.CLASSES
    names = {c["name"] for c in categories}
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not categories of {ann_file!r}; set the prompt's classes")
    return [int(c["id"]) for c in categories if c["name"] in set(classes)]


def image_id_of(img_meta: dict) -> int:
    """The COCO image id of an image, carried in ``img_meta['img_info']`` by the plugin's test pipeline."""
    info = img_meta.get("img_info")
    if not isinstance(info, dict) or "id" not in info:
        raise KeyError(
            "img_meta has no 'img_info' with an 'id'; add 'img_info' to Collect's meta_keys "
            "(see projects/configs/_base_/coco_instance_sam.py)"
        )
    return int(info["id"])
