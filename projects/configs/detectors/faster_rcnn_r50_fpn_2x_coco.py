"""Faster R-CNN R50-FPN 2x (COCO): mmdet's own config, as shipped inside the mmdet 2.28.2 package."""

import os

import mmdet

_base_ = os.path.join(
    os.path.dirname(mmdet.__file__), ".mim", "configs", "faster_rcnn", "faster_rcnn_r50_fpn_2x_coco.py"
)
