"""The demo config end to end: the trained tiny SAM with oracle boxes on a few generated demo images."""

from __future__ import annotations

import copy

import mmcv
import pytest
from mmdet.datasets import build_dataset
from mmdet.models import build_detector
from plugin_helpers import CONFIGS, REPO, direct_coco_ap, run_mmdet_test
from tool_loader import load_tool

NUM_IMAGES = 6



def test_tiny_sam_oracle_demo_segments_and_scores_like_cocoeval(monkeypatch, tmp_path):
    ckpt = REPO / "ckpt" / "tiny_sam.pth"
    if not ckpt.is_file():
        pytest.skip("ckpt/tiny_sam.pth is not committed (tools/train_tiny_sam.py)")
    demo = tmp_path / "demo"  # the first images of the default demo set (each image has its own seed)
    load_tool("make_demo_data").generate(demo, seed=0, num_train=0, num_val=NUM_IMAGES, size=128)
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(demo))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(ckpt.parent))
    cfg = mmcv.Config.fromfile(str(CONFIGS / "demo" / "tiny_sam_oracle.py"))
    dataset = build_dataset(dict(cfg.data.test, test_mode=True))
    dataset.data_infos = dataset.data_infos[:NUM_IMAGES]
    dataset.img_ids = dataset.img_ids[:NUM_IMAGES]
    results = run_mmdet_test(build_detector(cfg.model), dataset)
    metrics = dataset.evaluate(copy.deepcopy(results), metric=["segm"])
    coco = {"ann_file": cfg.data.test.ann_file, "classes": tuple(cfg.data.test.classes)}
    direct = direct_coco_ap(results, coco, "segm", image_ids=dataset.img_ids)
    assert metrics["segm_mAP"] == pytest.approx(direct[0], abs=5e-4)
    assert metrics["segm_mAP_50"] > 0.25  # a trained SAM with perfect boxes; a random one scores below 0.1
