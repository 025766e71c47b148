"""Faster R-CNN R50-FPN 2x boxes prompt SAM ViT-B on COCO val2017 (weights in AHCQ_CKPT_DIR, default ckpt)."""

import os

_base_ = ["../_base_/coco_instance_sam.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
model = dict(
    type="DetWrapperInstanceSAM",
    sam=dict(
        type="OfficialSAM", model_type="vit_b", checkpoint=os.path.join(ckpt_dir, "sam_vit_b_01ec64.pth")
    ),
    prompt=dict(
        type="MMDetPrompt",
        config="{{ fileDirname }}/../detectors/faster_rcnn_r50_fpn_2x_coco.py",
        checkpoint=os.path.join(
            ckpt_dir, "faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth"
        ),
        score_thr=0.05,
        max_boxes=100,
    ),
    num_classes=80,
    box_chunk=32,
    use_box_score=True,
)
