"""DetWrapperInstanceSAM end to end through mmdet's test loop and evaluation, against a direct COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings

import mmcv
import numpy as np
import pytest
import torch
from mmdet.apis import inference_detector
from mmdet.core import encode_mask_results
from mmdet.datasets.pipelines import Compose
from plugin_helpers import (
    CONFIGS,
    YOLOX_TINY,
    category_of,
    coco_stats,
    direct_coco_ap,
    run_mmdet_test,
    sam_dataset,
    small_sam,
)
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ahcq.models.sam_runner import decode_boxes, encode
from ahcq.solver.evaluation import build_split
from projects.instance_segment_anything import DetWrapperInstanceSAM, GTBoxPrompt, MMDetPrompt
from projects.instance_segment_anything.detector import _loaded_images
from projects.instance_segment_anything.results import to_mmdet_results


class CountingGTBoxPrompt(GTBoxPrompt):
    """Ground-truth prompts that count how often they are asked."""

    calls = 0

    def forward(self, image_bgr, img_meta):
        self.calls += 1
        return super().forward(image_bgr, img_meta)


def _model(coco: dict, **kwargs) -> DetWrapperInstanceSAM:
    prompt = dict(type="GTBoxPrompt", ann_file=coco["ann_file"], classes=coco["classes"])
    kwargs.setdefault("num_classes", len(coco["classes"]))
    return DetWrapperInstanceSAM(small_sam(), prompt, **kwargs)


def _first_batch(dataset, idx: int = 0) -> tuple[torch.Tensor, list[dict]]:
    data = dataset[idx]
    return data["img"][0][None], [data["img_metas"][0].data]


@pytest.mark.parametrize("coco_name", ["shapes_coco", "labelme_coco"])
def test_mmdet_evaluate_equals_direct_cocoeval(coco_name, request):
    coco = request.getfixturevalue(coco_name)
    dataset = sam_dataset(coco)
    results = run_mmdet_test(_model(coco, use_box_score=False), dataset)
    assert len(results) == len(dataset)
    metrics = dataset.evaluate(copy.deepcopy(results), metric=["bbox", "segm"])
    segm = direct_coco_ap(results, coco, "segm")
    bbox = direct_coco_ap(results, coco, "bbox")
    assert metrics["bbox_mAP"] == 1.0 and bbox[0] == pytest.approx(1.0)  # ground-truth boxes come back
    assert metrics["segm_mAP"] == pytest.approx(segm[0], abs=5e-4)
    assert metrics["segm_mAP_50"] == pytest.approx(segm[1], abs=5e-4)
    assert metrics["segm_mAP_l"] == pytest.approx(segm[5], abs=5e-4)


@pytest.mark.parametrize("coco_name", ["shapes_coco", "labelme_coco"])
def test_segm_map_of_half_perfect_masks_equals_cocoeval_of_the_raw_masks(coco_name, request):
    """Every other SAM mask swapped for its ground-truth mask, so that the mAP is neither 0 nor 1.

    The reference is COCOeval of the decoder's own masks, IoUs and labels, before any mmdet formatting.
    """
    coco = request.getfixturevalue(coco_name)
    dataset = sam_dataset(coco)
    model = _model(coco, use_box_score=False)
    gt = COCO(coco["ann_file"])
    cat_of = category_of(coco)
    results, dets = [], []
    for idx, info in enumerate(dataset.data_infos):
        (sample,) = model.prepare(*_first_batch(dataset, idx))
        image, labels = sample.image, sample.prompts.labels
        masks, iou = decode_boxes(model.sam, encode(model.sam, image), image, sample.prompts.boxes)
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[info["id"]]))
        assert len(anns) == len(masks)
        for k in range(0, len(anns), 2):
            masks[k] = torch.from_numpy(gt.annToMask(anns[k]).astype(bool))
        for mask, score, label in zip(masks.numpy(), iou.tolist(), labels.tolist()):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            category = cat_of[coco["classes"][label]]
            dets.append(
                {"image_id": info["id"], "category_id": category, "segmentation": rle, "score": score}
            )
        bbox_results, segm_results = to_mmdet_results(
            sample.prompts.boxes, iou, labels, masks, len(coco["classes"])
        )
        results.append((bbox_results, encode_mask_results(segm_results)))
    metrics = dataset.evaluate(copy.deepcopy(results), metric=["segm"])
    direct = coco_stats(coco, dets, "segm", [info["id"] for info in dataset.data_infos])
    assert 0.2 < metrics["segm_mAP"] < 0.9
    assert metrics["segm_mAP"] == pytest.approx(direct[0], abs=5e-4)
    assert metrics["segm_mAP_50"] == pytest.approx(direct[1], abs=5e-4)
    assert metrics["segm_mAP_75"] == pytest.approx(direct[2], abs=5e-4)


def test_results_hold_ground_truth_boxes_and_full_size_masks(shapes_coco):
    dataset = sam_dataset(shapes_coco)
    results = run_mmdet_test(_model(shapes_coco), dataset)
    for idx, (bbox_results, segm_results) in enumerate(results):
        gt = dataset.get_ann_info(idx)
        info = dataset.data_infos[idx]
        for label in range(len(shapes_coco["classes"])):
            expected = gt["bboxes"][gt["labels"] == label]
            np.testing.assert_array_equal(bbox_results[label][:, :4], expected)
            assert [tuple(m["size"]) for m in segm_results[label]] == [(info["height"], info["width"])] * len(
                expected
            )


def test_annotation_id_zero_is_matched_in_evaluation(labelme_coco):
    """Debian's labelme json numbers annotations from 0; pycocotools would count that ground truth as
    missed and its ground-truth box prompt as a false positive, so bbox mAP would fall short of 1."""
    raw = dict(labelme_coco, ann_file=os.path.join(labelme_coco["img_prefix"], "annotations.json"))
    assert 0 in COCO(raw["ann_file"]).anns
    cfg = mmcv.Config.fromfile(str(CONFIGS / "_base_" / "coco_instance_sam.py"))
    dataset = build_split(dict(cfg.data.test, **raw))
    assert 0 not in dataset.coco.anns and len(dataset.coco.anns) == len(COCO(raw["ann_file"]).anns)
    results = run_mmdet_test(_model(raw, use_box_score=False), dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = dataset.evaluate(results, metric=["bbox"])
    assert metrics["bbox_mAP"] == 1.0


def test_pipeline_gives_the_loaded_image_back(labelme_coco):
    dataset = sam_dataset(labelme_coco)
    img, metas = _first_batch(dataset)
    (image,) = _loaded_images(img, metas)
    np.testing.assert_array_equal(image, mmcv.imread(metas[0]["filename"]))


def test_a_resizing_pipeline_is_refused(shapes_coco):
    dataset = sam_dataset(shapes_coco)
    dataset.pipeline = Compose(
        [
            dict(type="LoadImageFromFile"),
            dict(
                type="MultiScaleFlipAug",
                img_scale=(200, 100),
                flip=False,
                transforms=[
                    dict(type="Resize", keep_ratio=True),
                    dict(type="Normalize", mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True),
                    dict(type="Pad", size_divisor=1),
                    dict(type="ImageToTensor", keys=["img"]),
                    dict(type="Collect", keys=["img"]),
                ],
            ),
        ]
    )
    img, metas = _first_batch(dataset)
    with pytest.raises(ValueError, match="resized by the test pipeline"):
        _model(shapes_coco).simple_test(img, metas)


def test_cached_inputs_reproduce_simple_test_without_rerunning_prompts(shapes_coco):
    dataset = sam_dataset(shapes_coco)
    prompt = CountingGTBoxPrompt(shapes_coco["ann_file"], classes=shapes_coco["classes"])
    model = DetWrapperInstanceSAM(small_sam(), prompt, num_classes=2, box_chunk=1).eval()
    img, metas = _first_batch(dataset, 1)
    (expected,) = model.simple_test(img, metas)
    (sample,) = model.prepare(img, metas)
    assert prompt.calls == 2
    assert sample.image.tensor.shape == (1, 3, 64, 64) and len(sample.prompts.boxes) >= 2
    embedding = model.extract_feat(img, metas)
    for got in (model.predict_cached(sample), model.predict_cached(sample, embedding)):
        for label in range(2):
            np.testing.assert_array_equal(got[0][label], expected[0][label])
            np.testing.assert_array_equal(np.array(got[1][label]), np.array(expected[1][label]))
    assert prompt.calls == 2


def test_box_score_flag_multiplies_scores(shapes_coco):
    dataset = sam_dataset(shapes_coco)
    img, metas = _first_batch(dataset)
    (sample,) = _model(shapes_coco).prepare(img, metas)
    sample.prompts.scores = torch.full_like(sample.prompts.scores, 0.5)
    with_box = _model(shapes_coco, use_box_score=True).predict_cached(sample)
    iou_only = _model(shapes_coco, use_box_score=False).predict_cached(sample)
    for label in range(2):
        np.testing.assert_allclose(with_box[0][label][:, 4], 0.5 * iou_only[0][label][:, 4], rtol=1e-6)


def test_bad_configuration_is_named(shapes_coco):
    with pytest.raises(ValueError, match="box_chunk"):
        _model(shapes_coco, box_chunk=0)
    with pytest.raises(TypeError, match="GTBoxPrompt.*ann_fle"):
        DetWrapperInstanceSAM(small_sam(), dict(type="GTBoxPrompt", ann_fle=shapes_coco["ann_file"]))
    with pytest.raises(KeyError, match="NoSuchPrompt"):
        DetWrapperInstanceSAM(small_sam(), dict(type="NoSuchPrompt"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        DetWrapperInstanceSAM(
            dict(type="TinySAM", checkpoint="missing.pth"), dict(type="GTBoxPrompt", ann_file="x")
        )
    dataset = sam_dataset(shapes_coco)
    img, metas = _first_batch(dataset)
    with pytest.raises(ValueError, match="num_classes=1"):
        _model(shapes_coco, num_classes=1).simple_test(img, metas)


def test_an_image_without_prompts_gives_empty_results(tmp_path, shapes_coco):
    det_file = tmp_path / "none.bbox.json"
    det_file.write_text("[]")
    prompt = dict(type="DetectionFilePrompt", det_file=str(det_file), ann_file=shapes_coco["ann_file"])
    model = DetWrapperInstanceSAM(small_sam(), dict(prompt, classes=shapes_coco["classes"]), num_classes=2)
    ((bbox_results, segm_results),) = model.simple_test(*_first_batch(sam_dataset(shapes_coco)))
    assert [b.shape for b in bbox_results] == [(0, 5), (0, 5)] and segm_results == [[], []]


def test_detector_prompts_through_the_pipeline_are_the_detectors_boxes_on_the_file(labelme_coco):
    if not os.path.isfile(YOLOX_TINY):
        pytest.skip(f"mmdet package ships no configs ({YOLOX_TINY} absent)")
    prompt = MMDetPrompt(YOLOX_TINY, checkpoint=None, score_thr=0.0, max_boxes=20)
    model = DetWrapperInstanceSAM(small_sam(), prompt, num_classes=80).eval()
    dataset = sam_dataset(labelme_coco)
    img, metas = _first_batch(dataset, 2)
    with warnings.catch_warnings():  # first: mmdet's array path rewrites the detector's own cfg in place
        warnings.simplefilter("ignore")
        reference = np.concatenate(inference_detector(prompt.detector, metas[0]["filename"]))
    (sample,) = model.prepare(img, metas)
    top = reference[np.argsort(-reference[:, 4], kind="stable")[:20]]
    height, width = metas[0]["ori_shape"][:2]
    top[:, 0:4:2] = top[:, 0:4:2].clip(0, width)
    top[:, 1:4:2] = top[:, 1:4:2].clip(0, height)
    np.testing.assert_allclose(sample.prompts.boxes.numpy(), top[:, :4], rtol=1e-5, atol=1e-3)
    bbox_results, segm_results = model.predict_cached(sample)
    assert sum(len(b) for b in bbox_results) == 20
    assert all(m.shape == (height, width) for masks in segm_results for m in masks)
