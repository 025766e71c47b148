"""YOLOX-L boxes prompt SAM ViT-B on COCO val2017 (weights under AHCQ_CKPT_DIR, default ckpt).

YOLOX has no per-image box cap; as in the reference setup every box scoring >= 0.05 prompts SAM.
"""

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
        config="{{ fileDirname }}/../detectors/yolox_l_8x8_300e_coco.py",
        checkpoint=os.path.join(ckpt_dir, "yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth"),
        score_thr=0.05,
        max_boxes=None,
    ),
    num_classes=80,
    box_chunk=32,
    use_box_score=True,
)
