"""Oracle demo: ground-truth boxes of the generated demo val set prompt the tiny SAM (CPU, seconds).

Data under AHCQ_DEMO_ROOT (default data/demo, made by tools/make_demo_data.py); weights tiny_sam.pth under
AHCQ_CKPT_DIR (default ckpt). Oracle prompts score 1, so the mAP measures SAM's masks alone.
"""

import os

import ahcq.data.shapes as shapes

_base_ = ["../_base_/coco_instance_sam.py"]
demo_root = os.environ.get("AHCQ_DEMO_ROOT", "data/demo")
ckpt_dir = os.environ.get("AHCQ_CKPT_DIR", "ckpt")
classes = shapes.CATEGORIES
train_ann = os.path.join(demo_root, "annotations", "instances_train.json")
val_ann = os.path.join(demo_root, "annotations", "instances_val.json")
train_dir = os.path.join(demo_root, "train", "")
val_dir = os.path.join(demo_root, "val", "")
data = dict(
    train=dict(ann_file=train_ann, img_prefix=train_dir, classes=classes),
    val=dict(ann_file=val_ann, img_prefix=val_dir, classes=classes),
    test=dict(ann_file=val_ann, img_prefix=val_dir, classes=classes),
)
model = dict(
    type="DetWrapperInstanceSAM",
    sam=dict(type="TinySAM", checkpoint=os.path.join(ckpt_dir, "tiny_sam.pth")),
    # the demo's splits reuse image ids, so ground truth is found by image path
    prompt=dict(
        type="GTBoxPrompt", ann_file=[val_ann, train_ann], img_prefix=[val_dir, train_dir], classes=classes
    ),
    num_classes=len(classes),
    box_chunk=32,
    use_box_score=False,
)
# what test_quant.py runs with this config unless told otherwise: the demo's recipe, encoder quantized
ahcq_defaults = dict(q_config="exp/demo.yaml", quant_encoder=True)
