"""Prompt sources: detection files read back, ground truth equal to mmdet's, a real mmdet detector."""

from __future__ import annotations

import json
import os
import warnings

import mmcv
import numpy as np
import pytest
from mmdet.apis import inference_detector
from plugin_helpers import YOLOX_TINY, sam_dataset

from projects.instance_segment_anything import DetectionFilePrompt, GTBoxPrompt, MMDetPrompt


def _meta(image_id: int) -> dict:
    return {"img_info": {"id": image_id}}


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_detection_file_reads_back_the_boxes_written(tmp_path, shapes_coco, rng):
    cat_ids = [3, 5]  # shapes_coco's categories, label 0 and 1
    written = {}
    dets = []
    for image_id in (11, 12):
        xy = rng.uniform(0, 50, (7, 2))
        wh = rng.uniform(1, 30, (7, 2))
        scores = rng.permutation(np.linspace(0.1, 0.9, 7))
        labels = rng.integers(0, 2, 7)
        written[image_id] = (np.concatenate([xy, xy + wh], 1), scores, labels)
        dets += [
            {"image_id": image_id, "category_id": cat_ids[c], "bbox": [*p, *s], "score": sc}
            for p, s, sc, c in zip(xy.tolist(), wh.tolist(), scores.tolist(), labels.tolist())
        ]
    det_file = _write(tmp_path / "dets.bbox.json", dets)
    source = DetectionFilePrompt(det_file, shapes_coco["ann_file"], classes=shapes_coco["classes"])
    for image_id, (boxes, scores, labels) in written.items():
        order = np.argsort(-scores)
        prompts = source(None, _meta(image_id))
        np.testing.assert_allclose(prompts.boxes.numpy(), boxes[order], rtol=1e-6)
        np.testing.assert_allclose(prompts.scores.numpy(), scores[order], rtol=1e-6)
        np.testing.assert_array_equal(prompts.labels.numpy(), labels[order])
    capped = DetectionFilePrompt(
        det_file, shapes_coco["ann_file"], shapes_coco["classes"], score_thr=0.35, max_boxes=3
    )
    boxes, scores, _ = written[11]
    kept = capped(None, _meta(11))
    np.testing.assert_allclose(kept.scores.numpy(), np.sort(scores[scores >= 0.35])[::-1][:3], rtol=1e-6)
    assert len(source(None, _meta(13)).boxes) == 0


def test_detection_file_errors_name_the_culprit(tmp_path, shapes_coco):
    ann, classes = shapes_coco["ann_file"], shapes_coco["classes"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DetectionFilePrompt(str(tmp_path / "missing.json"), ann, classes)
    bad = _write(tmp_path / "bad.json", [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"bad\.json.*entry 0.*category_id"):
        DetectionFilePrompt(bad, ann, classes)
    alien = _write(
        tmp_path / "alien.json", [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1], "score": 1}]
    )
    with pytest.raises(ValueError, match="category_id 99"):
        DetectionFilePrompt(alien, ann, classes)
    with pytest.raises(ValueError, match=r"classes \['cat'\]"):
        DetectionFilePrompt(bad, ann, classes=("cat",))
    good = _write(tmp_path / "good.json", [])
    with pytest.raises(KeyError, match="img_info"):
        DetectionFilePrompt(good, ann, classes)(None, {"ori_filename": "x.png"})


@pytest.mark.parametrize("coco_name", ["shapes_coco", "labelme_coco"])
def test_gt_boxes_equal_mmdets_ground_truth(coco_name, request):
    coco = request.getfixturevalue(coco_name)
    dataset = sam_dataset(coco)
    source = GTBoxPrompt(coco["ann_file"], classes=coco["classes"])
    total = 0
    for idx, info in enumerate(dataset.data_infos):
        gt = dataset.get_ann_info(idx)
        prompts = source(None, _meta(info["id"]))
        np.testing.assert_array_equal(prompts.boxes.numpy(), gt["bboxes"])
        np.testing.assert_array_equal(prompts.labels.numpy(), gt["labels"])
        assert np.all(prompts.scores.numpy() == 1)
        total += len(gt["bboxes"])
    assert total >= 6


def test_gt_boxes_from_several_files_by_id_or_by_path(tmp_path, shapes_coco):
    ann, classes = shapes_coco["ann_file"], shapes_coco["classes"]
    data = json.loads(open(ann).read())
    with pytest.raises(ValueError, match="image 11 is also in an earlier file"):
        GTBoxPrompt([ann, _write(tmp_path / "dup.json", data)], classes=classes)
    first_box = data["annotations"][0]["bbox"]
    data["annotations"] = [dict(data["annotations"][0], bbox=[1, 2, 3, 4])]
    twin = _write(tmp_path / "twin.json", data)  # same image ids and names, other folder and boxes
    source = GTBoxPrompt([ann, twin], img_prefix=[shapes_coco["img_prefix"], "elsewhere"], classes=classes)
    ours = source(None, {"filename": os.path.join(shapes_coco["img_prefix"], "img_11.png")})
    theirs = source(None, {"filename": os.path.join("elsewhere", "img_11.png")})
    assert ours.boxes[0].tolist() == [
        first_box[0],
        first_box[1],
        first_box[0] + first_box[2],
        first_box[1] + first_box[3],
    ]
    assert theirs.boxes.tolist() == [[1, 2, 4, 6]]
    with pytest.raises(KeyError, match="is in none of the ann_file"):
        source(None, {"filename": "nowhere/img_11.png"})
    with pytest.raises(KeyError, match="image 5 is in none"):
        GTBoxPrompt(ann, classes=classes)(None, _meta(5))
    with pytest.raises(ValueError, match="img_prefix has 1 entries for 2"):
        GTBoxPrompt([ann, twin], img_prefix="x", classes=classes)


def test_mmdet_detector_prompts_are_mmdets_own_boxes_in_image_coordinates(labelme_coco):
    if not os.path.isfile(YOLOX_TINY):
        pytest.skip(f"mmdet package ships no configs ({YOLOX_TINY} absent)")
    source = MMDetPrompt(YOLOX_TINY, checkpoint=None, score_thr=0.0, max_boxes=None)
    path = os.path.join(labelme_coco["img_prefix"], "JPEGImages", "2011_000003.jpg")
    with warnings.catch_warnings():  # first: mmdet's array path rewrites the detector's own cfg in place
        warnings.simplefilter("ignore")
        reference = inference_detector(source.detector, path)
    image = mmcv.imread(path)
    prompts = source(image, {})
    boxes = np.concatenate(reference)
    assert len(prompts.boxes) == len(boxes) > 0
    order = np.argsort(-boxes[:, 4], kind="stable")
    np.testing.assert_allclose(prompts.boxes.numpy(), boxes[order, :4], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(prompts.scores.numpy(), boxes[order, 4], rtol=1e-5)
    labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(reference)])
    np.testing.assert_array_equal(prompts.labels.numpy(), labels[order])
    clipped = prompts.clip(*image.shape[:2]).boxes.numpy()
    assert (
        clipped.min() >= 0
        and clipped[:, 0::2].max() <= image.shape[1]
        and clipped[:, 1::2].max() <= image.shape[0]
    )
    top = MMDetPrompt(YOLOX_TINY, None, score_thr=0.0, max_boxes=5)
    top.detector.load_state_dict(source.detector.state_dict())
    np.testing.assert_allclose(top(image, {}).scores.numpy(), prompts.scores.numpy()[:5], rtol=1e-5)


def test_mmdet_detector_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        MMDetPrompt(str(tmp_path / "nope.py"))
    if os.path.isfile(YOLOX_TINY):
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            MMDetPrompt(YOLOX_TINY, checkpoint=str(tmp_path / "nope.pth"))
