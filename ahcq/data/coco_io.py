"""COCO instance-segmentation json: building records from binary masks, atomic writing, loading.

Masks are stored as compressed RLE (pycocotools), with area and bbox measured on the mask itself so
that every annotation agrees with what COCOeval decodes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary HxW mask -> json-ready compressed RLE ({'size': [h, w], 'counts': str})."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE (counts as str or bytes) -> boolean HxW mask."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    coded = {"size": list(rle["size"]), "counts": counts}
    return mask_utils.decode(coded).astype(bool)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight COCO box [x, y, w, h] of a non-empty mask, in pixel-edge coordinates."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("empty mask has no bounding box")
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    """One COCO annotation (iscrowd 0) whose area and bbox are measured on ``mask``."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": mask_to_rle(mask),
        "area": float(mask.sum()),
        "bbox": mask_bbox(mask),
        "iscrowd": 0,
    }


def categories(names: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """COCO category list with ids 1..N (0 is left free, as in COCO)."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the target folder, then os.replace, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_coco_json(path: str | os.PathLike, dataset: dict[str, Any]) -> None:
    """Atomically write a COCO dict with a stable key order (byte-identical for equal content)."""
    atomic_write_bytes(path, json.dumps(dataset, separators=(",", ":")).encode("utf-8"))


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO json and check the keys an instance-segmentation set needs."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    missing = {"images", "annotations", "categories"} - set(data)
    if missing:
        raise ValueError(f"{path}: not a COCO instance file, missing keys {sorted(missing)}")
    return data
