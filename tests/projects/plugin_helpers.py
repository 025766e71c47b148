"""Helpers for the plugin tests: a small SAM, mmdet's own dataset/test loop, and an independent COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mmcv
import mmdet
import numpy as np
import torch
from mmcv.parallel import MMDataParallel
from mmdet.apis import single_gpu_test
from mmdet.datasets import build_dataloader, build_dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything.modeling import Sam

from ahcq.models.tiny_sam import build_tiny_sam

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "projects" / "configs"
YOLOX_TINY = str(Path(mmdet.__file__).parent / ".mim" / "configs" / "yolox" / "yolox_tiny_8x8_300e_coco.py")


SMALL_SAM = dict(
    img_size=64,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    window_size=4,
    global_attn_indexes=(1,),
    out_chans=32,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def small_sam(seed: int = 0) -> Sam:
    """A random SAM from segment_anything's classes (``SMALL_SAM`` sizes), run in well under a second."""
    torch.manual_seed(seed)
    return build_tiny_sam(**SMALL_SAM)


def sam_dataset(coco: dict):
    """An mmdet CocoDataset (test mode) over ``coco`` with the plugin's own test pipeline."""
    cfg = mmcv.Config.fromfile(str(CONFIGS / "_base_" / "coco_instance_sam.py"))
    return build_dataset(dict(cfg.data.test, test_mode=True, **coco))


def run_mmdet_test(model: torch.nn.Module, dataset) -> list:
    """Results of ``model`` over ``dataset`` through mmdet's own dataloader and ``single_gpu_test``."""
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False, shuffle=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return single_gpu_test(MMDataParallel(model.eval()), loader)


def coco_stats(coco: dict, dets: list[dict], iou_type: str, image_ids: list[int]) -> np.ndarray:
    """pycocotools COCOeval stats of COCO-format detections over ``image_ids`` and the classes of ``coco``."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(coco["ann_file"])
        cat_of = {c["name"]: c["id"] for c in gt.dataset["categories"]}
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.params.catIds = [cat_of[name] for name in coco["classes"]]
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def category_of(coco: dict) -> dict[str, int]:
    """COCO category id by class name."""
    with open(coco["ann_file"]) as f:
        return {c["name"]: c["id"] for c in json.load(f)["categories"]}


def direct_coco_ap(
    results: list, coco: dict, iou_type: str, image_ids: list[int] | None = None
) -> np.ndarray:
    """COCOeval stats of mmdet-format results, converted here without mmdet (category ids by class name).

    ``results[i]`` belongs to ``image_ids[i]`` (default: every image, in the json's order).
    """
    cat_of = category_of(coco)
    if image_ids is None:
        with open(coco["ann_file"]) as f:
            image_ids = [image["id"] for image in json.load(f)["images"]]
    dets = []
    for image_id, (bbox_results, segm_results) in zip(image_ids, results, strict=True):
        for label, name in enumerate(coco["classes"]):
            for (x1, y1, x2, y2, score), rle in zip(bbox_results[label], segm_results[label]):
                det = {"image_id": image_id, "category_id": cat_of[name], "score": float(score)}
                if iou_type == "bbox":
                    det["bbox"] = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
                else:
                    det["segmentation"] = rle
                dets.append(det)
    return coco_stats(coco, dets, iou_type, image_ids)
