"""Two-stage Deformable DETR with box refinement, R50 (COCO): mmdet's config from mmdet 2.28.2.

The mmcv multi-scale deformable attention falls back to its pure PyTorch form on CPU.
"""

import os

import mmdet

_base_ = os.path.join(
    os.path.dirname(mmdet.__file__),
    ".mim",
    "configs",
    "deformable_detr",
    "deformable_detr_twostage_refine_r50_16x2_50e_coco.py",
)
