"""FocalNet-L DINO boxes prompt SAM ViT-B on COCO val2017, read from COCO-format detection files.

Detection files live under AHCQ_DET_DIR (default data/detections): val2017 for evaluation and train2017
for the calibration images; the top 300 boxes per image are used, as DINO outputs them.
"""

import os

_base_ = ["../_base_/coco_instance_sam.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
det_dir = os.environ.get("AHCQ_DET_DIR", "data/detections")
coco_root = os.environ.get("AHCQ_DATA_ROOT", "data/coco")
model = dict(
    type="DetWrapperInstanceSAM",
    sam=dict(
        type="OfficialSAM", model_type="vit_b", checkpoint=os.path.join(ckpt_dir, "sam_vit_b_01ec64.pth")
    ),
    prompt=dict(
        type="DetectionFilePrompt",
        det_file=[
            os.path.join(det_dir, "focalnet_dino_l_val2017.bbox.json"),
            os.path.join(det_dir, "focalnet_dino_l_train2017.bbox.json"),
        ],
        ann_file=os.path.join(coco_root, "annotations", "instances_val2017.json"),
        score_thr=0.0,
        max_boxes=300,
    ),
    num_classes=80,
    box_chunk=32,
    use_box_score=True,
)
