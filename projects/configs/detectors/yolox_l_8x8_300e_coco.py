"""YOLOX-L (COCO, 300 epochs): mmdet's own config, as shipped inside the mmdet 2.28.2 package."""

import os

import mmdet

_base_ = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "yolox", "yolox_l_8x8_300e_coco.py")
