"""YOLOX-L boxes prompt SAM 2.1 Hiera-T on COCO val2017, run as sam2's ``SAM2ImagePredictor`` runs it
(AHCQ-SAM's SAM2 image path); weights under AHCQ_CKPT_DIR, default ckpt. Otherwise the ViT-B config."""

import os

_base_ = ["./yolo_l-sam-vit-b.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
model = dict(
    sam=dict(_delete_=True, type="OfficialSAM2", model_type="t",
             checkpoint=os.path.join(ckpt_dir, "sam2.1_hiera_tiny.pt")),
)
