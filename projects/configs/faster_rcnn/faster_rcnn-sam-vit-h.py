"""As faster_rcnn-sam-vit-b.py, with SAM ViT-H."""

import os

_base_ = ["./faster_rcnn-sam-vit-b.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
model = dict(sam=dict(model_type="vit_h", checkpoint=os.path.join(ckpt_dir, "sam_vit_h_4b8939.pth")))
