"""Fixtures for the mmdet plugin: a tiny random SAM, a drawn-shapes COCO set, the labelme-examples photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mmcv
import numpy as np
import pytest
from plugin_helpers import small_sam
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam

LABELME_COCO = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")
SHAPE_CLASSES = ("square", "disc")


@pytest.fixture
def sam() -> Sam:
    """A fresh small random SAM (seeded)."""
    return small_sam()


def _shape_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """A noisy background with 2-3 filled squares and discs: the BGR image and (class index, mask) pairs."""
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    objects = []
    for _ in range(int(rng.integers(2, 4))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        size = int(rng.integers(12, min(height, width) // 2))
        y0, x0 = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
        if SHAPE_CLASSES[cls] == "square":
            mask = (yy >= y0) & (yy < y0 + size) & (xx >= x0) & (xx < x0 + size)
        else:
            r = size / 2
            mask = (yy - y0 - r + 0.5) ** 2 + (xx - x0 - r + 0.5) ** 2 <= r * r
        image[mask] = rng.integers(120, 255, 3, dtype=np.uint8)
        objects.append((cls, mask))
    return image, objects


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four drawn images (one portrait) with a COCO instances json whose boxes come from the masks."""
    root = tmp_path_factory.mktemp("shapes_coco")
    rng = np.random.default_rng(7)
    images, annotations = [], []
    for image_id, (h, w) in enumerate([(60, 80), (80, 60), (72, 96), (64, 64)], start=11):
        image, objects = _shape_image(rng, h, w)
        file_name = f"img_{image_id}.png"
        mmcv.imwrite(image, str(root / "images" / file_name))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for cls, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 3 + 2 * cls,
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": [x, y, bw, bh],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 3 + 2 * i, "name": name} for i, name in enumerate(SHAPE_CLASSES)]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"ann_file": str(ann_file), "img_prefix": str(root / "images") + os.sep, "classes": SHAPE_CLASSES}


@pytest.fixture(scope="session")
def labelme_coco(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Debian's labelme-examples: three real VOC photos with a COCO instances json (polygons).

    The json is copied with annotation ids shifted by one: pycocotools stores matches as annotation
    ids, so a ground truth with id 0 would always count as unmatched.
    """
    ann_file = LABELME_COCO / "annotations.json"
    if not ann_file.is_file():
        pytest.skip(f"Debian package labelme-examples is not installed ({ann_file} absent)")
    data = json.loads(ann_file.read_text())
    for ann in data["annotations"]:
        ann["id"] += 1
    copy = tmp_path_factory.mktemp("labelme_coco") / "annotations.json"
    copy.write_text(json.dumps(data))
    classes = tuple(c["name"] for c in data["categories"] if c["name"] != "_background_")
    return {"ann_file": str(copy), "img_prefix": str(LABELME_COCO) + os.sep, "classes": classes}
