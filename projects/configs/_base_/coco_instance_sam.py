"""COCO 2017 instance segmentation as the SAM wrapper reads it: original-size RGB images, one per batch.

The data root comes from AHCQ_DATA_ROOT (default data/coco). The test pipeline does not resize: SAM
resizes each image itself, and prompt detectors run their own pipelines on the loaded image. Normalize
with mean 0 / std 1 only converts BGR to RGB. 'img_info' travels in img_metas so that file-based prompt
sources find the image id. train2017 (the calibration set) uses the same pipeline.
"""

import os

dataset_type = "CocoDataset"
data_root = os.environ.get("AHCQ_DATA_ROOT", "data/coco")
sam_img_norm_cfg = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], to_rgb=True)
sam_meta_keys = (
    "filename",
    "ori_filename",
    "ori_shape",
    "img_shape",
    "pad_shape",
    "scale_factor",
    "flip",
    "flip_direction",
    "img_norm_cfg",
    "img_info",
)
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(
        type="MultiScaleFlipAug",
        scale_factor=1.0,
        flip=False,
        transforms=[
            dict(type="Normalize", **sam_img_norm_cfg),
            dict(type="Pad", size_divisor=1),
            dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"], meta_keys=sam_meta_keys),
        ],
    ),
]
data = dict(
    samples_per_gpu=1,
    workers_per_gpu=2,
    train=dict(
        type=dataset_type,
        ann_file=os.path.join(data_root, "annotations", "instances_train2017.json"),
        img_prefix=os.path.join(data_root, "train2017", ""),
        pipeline=test_pipeline,
    ),
    val=dict(
        type=dataset_type,
        ann_file=os.path.join(data_root, "annotations", "instances_val2017.json"),
        img_prefix=os.path.join(data_root, "val2017", ""),
        pipeline=test_pipeline,
    ),
    test=dict(
        type=dataset_type,
        ann_file=os.path.join(data_root, "annotations", "instances_val2017.json"),
        img_prefix=os.path.join(data_root, "val2017", ""),
        pipeline=test_pipeline,
    ),
)
evaluation = dict(metric=["bbox", "segm"])
plugin = True
plugin_dir = "projects/instance_segment_anything/"
custom_imports = dict(imports=["projects.instance_segment_anything"], allow_failed_imports=False)
