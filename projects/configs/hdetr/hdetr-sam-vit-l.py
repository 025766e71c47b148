"""As hdetr-sam-vit-b.py, with SAM ViT-L."""

import os

_base_ = ["./hdetr-sam-vit-b.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
model = dict(sam=dict(model_type="vit_l", checkpoint=os.path.join(ckpt_dir, "sam_vit_l_0b3195.pth")))
