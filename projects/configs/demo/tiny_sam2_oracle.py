"""Oracle demo on SAM2: ground-truth boxes of the generated demo val set prompt the tiny SAM 2.1 testbed
(trained on the generated clips by tools/train_tiny_sam2.py) as an image model, the way
``SAM2ImagePredictor`` runs it (CPU, seconds).

Data under AHCQ_DEMO_ROOT (default data/demo, made by tools/make_demo_data.py); weights tiny_sam2.pt and its
json sidecar under AHCQ_CKPT_DIR (default ckpt).
"""

import os

_base_ = ["./tiny_sam_oracle.py"]
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
model = dict(sam=dict(_delete_=True, type="TinySAM2", checkpoint=os.path.join(ckpt_dir, "tiny_sam2.pt")))
# what test_quant.py runs with this config unless told otherwise: the demo's recipe, encoder quantized
ahcq_defaults = dict(q_config="exp/demo.yaml", quant_encoder=True)
