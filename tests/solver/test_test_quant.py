"""test_quant.py end to end: the demo config on generated shapes and labelme's real photos, a small SAM.

Float masks and AP are checked against segment_anything's own ``SamPredictor`` scored by pycocotools
directly; quantized runs against the float masks of the same run; the cache by counting prompt calls.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import textwrap
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything import SamPredictor
from tool_loader import load_tool

from ahcq.data.shapes import CATEGORIES
from ahcq.deploy import unpack_model
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.solver.test_quant import main
from projects.instance_segment_anything import GTBoxPrompt
from projects.instance_segment_anything.registry import PROMPT_SOURCES

REPO = Path(__file__).resolve().parents[2]
LABELME = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")
SIZES = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
             global_attn_indexes=[1], out_chans=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
             iou_head_hidden_dim=32)
make_demo_data = load_tool("make_demo_data")


@PROMPT_SOURCES.register_module(force=True)
class CountingGTBoxPrompt(GTBoxPrompt):
    """Ground-truth boxes, counting how often the prompt source really runs."""

    calls = 0

    def forward(self, image_bgr: np.ndarray, img_meta: dict):
        type(self).calls += 1
        return super().forward(image_bgr, img_meta)


def _sam_from(ckpt: Path):
    return build_tiny_sam(**{**SIZES, "global_attn_indexes": tuple(SIZES["global_attn_indexes"])},
                          checkpoint=ckpt)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random small SAM saved as a plain state dict in the official key layout."""
    torch.manual_seed(3)
    sam = build_tiny_sam(**{**SIZES, "global_attn_indexes": (1,)})
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path


def _size_options() -> list[str]:
    return [f"model.sam.{k}={json.dumps(v).replace(' ', '')}" for k, v in SIZES.items()]


def _w8a8(tmp: Path) -> Path:
    path = tmp / "w8a8.yaml"
    path.write_text(textwrap.dedent(f"""\
        base: {REPO / 'exp' / 'minmax' / 'w4a4.yaml'}
        a_qconfig: {{bit: 8}}
        w_qconfig: {{bit: 8, ch_axis: 0}}
        """))
    return path


def _config44(tmp: Path) -> Path:
    """exp/config44.yaml (the full AHCQ-SAM recipe) with a token reconstruction budget."""
    path = tmp / "config44_short.yaml"
    path.write_text(f"base: {REPO / 'exp' / 'config44.yaml'}\nrecon: {{iters: 2}}\n")
    return path


def _run(args: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text(), parse_constant=_no_constants)


def _no_constants(name: str):
    raise AssertionError(f"results.json holds the non-JSON constant {name}")


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _reference(ann_file: Path, img_dir: Path, classes: tuple, ckpt: Path) -> list[dict]:
    """SamPredictor masks and predicted IoUs for every kept GT box (independent of ahcq's pipeline)."""
    gt = _quiet_coco(ann_file)
    keep = {c["id"] for c in gt.dataset["categories"] if c["name"] in classes}
    predictor = SamPredictor(_sam_from(ckpt))
    dets = []
    for info in gt.dataset["images"]:
        image = np.asarray(mmcv.imread(str(img_dir / info["file_name"]), channel_order="rgb"))
        anns = [a for a in gt.imgToAnns[info["id"]] if a["category_id"] in keep and not a.get("iscrowd")
                and a["area"] > 0 and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        if not anns:
            continue
        predictor.set_image(image)
        h, w = image.shape[:2]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        with torch.no_grad():
            masks, iou, _ = predictor.predict_torch(
                None, None, predictor.transform.apply_boxes_torch(boxes, (h, w)), multimask_output=False)
        for a, box, m, s in zip(anns, boxes.tolist(), masks[:, 0].numpy(), iou[:, 0].tolist()):
            dets.append({"ann": a, "image_id": info["id"], "category_id": a["category_id"], "mask": m,
                         "score": s, "box": tuple(np.round(a["bbox"], 2)), "xyxy": [round(v) for v in box]})
    return dets


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _pseudo_gt(ann_file: Path, dets: list[dict], out: Path) -> Path:
    """The annotations with every other mask set to the float SAM's own mask and the rest to its
    complement inside the box, so that the float model's mask AP of a random SAM lies inside (0, 100)."""
    data = json.loads(ann_file.read_text())
    by_id = {d["ann"]["id"]: d for d in dets}
    for i, ann in enumerate(a for a in data["annotations"] if a["id"] in by_id):
        mask = by_id[ann["id"]]["mask"].copy()
        if i % 2 or not mask.any():
            x1, y1, x2, y2 = by_id[ann["id"]]["xyxy"]
            box = np.zeros_like(mask)
            box[y1:y2, x1:x2] = True
            mask = box & ~mask if (box & ~mask).any() else box
        ann.update(segmentation=_rle(mask), area=float(mask.sum()), iscrowd=0)
    out.write_text(json.dumps(data))
    return out


def _reference_ap(gt_file: Path, dets: list[dict]) -> float:
    """COCO segm AP x 100 of the reference masks, straight from pycocotools, on annotation ids from 1
    (COCOeval reads a match with annotation id 0 as no match; labelme's json starts at 0)."""
    data = json.loads(gt_file.read_text())
    for ann in data["annotations"]:
        ann["id"] += 1
    shifted = gt_file.with_name(f"{gt_file.stem}.ids_from_1.json")
    shifted.write_text(json.dumps(data))
    gt = _quiet_coco(shifted)
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], "segmentation": _rle(d["mask"]),
                "score": d["score"]} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100.0 * ev.stats[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ckpt) -> dict:
    """The demo config on 4 generated val / 3 train images: fp-only, W8A8 (cache reuse), W4A4 config44."""
    root = tmp_path_factory.mktemp("shapes")
    make_demo_data.generate(root / "demo", seed=5, num_train=3, num_val=4, size=64)
    val = root / "demo/annotations/instances_val.json"
    dets = _reference(val, root / "demo/val", CATEGORIES, ckpt)
    _pseudo_gt(val, dets, val)
    cache = root / "cache"
    base = ["--config", str(REPO / "projects/configs/demo/tiny_sam_oracle.py"), "--cache-dir", str(cache),
            "--calib-images", "2", "--cfg-options", "model.prompt.type=CountingGTBoxPrompt", *_size_options()]
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHCQ_DEMO_ROOT", str(root / "demo"))
        mp.setenv("AHCQ_CKPT_DIR", str(ckpt.parent))
        CountingGTBoxPrompt.calls = 0
        runs["fp"] = _run(["--fp-only", "--out", str(root / "fp"), *base])
        calls_after_fp = CountingGTBoxPrompt.calls
        runs["w8a8"] = _run(["--q_config", str(_w8a8(root)), "--backend", "onnxruntime", "--out",
                             str(root / "w8a8"), *base])
        calls_after_w8a8 = CountingGTBoxPrompt.calls
        runs["w4a4"] = _run(["--q_config", str(_config44(root)), "--quant-encoder", "--skip-fp", "--pack",
                             "--out", str(root / "w4a4"), *base])
        calls_after_w4a4 = CountingGTBoxPrompt.calls
    return {"root": root, "runs": runs, "fp_dir": root / "fp", "w8a8_dir": root / "w8a8", "reference": dets,
            "gt": val, "calls": (calls_after_fp, calls_after_w8a8, calls_after_w4a4)}


@pytest.fixture(scope="module")
def labelme(tmp_path_factory, ckpt) -> dict:
    """labelme-examples' three VOC photos as both calibration and evaluation set, W8A8."""
    ann_file = LABELME / "annotations.json"
    if not ann_file.is_file():
        pytest.skip(f"Debian package labelme-examples is not installed ({ann_file} absent)")
    root = tmp_path_factory.mktemp("labelme")
    classes = tuple(c["name"] for c in json.loads(ann_file.read_text())["categories"] if c["id"] > 0)
    dets = _reference(ann_file, LABELME, classes, ckpt)
    gt = _pseudo_gt(ann_file, dets, root / "annotations.json")
    split = dict(ann_file=str(gt), img_prefix=str(LABELME) + os.sep, classes=classes)
    config = root / "labelme_sam.py"
    config.write_text(textwrap.dedent(f"""\
        _base_ = [{str(REPO / 'projects/configs/_base_/coco_instance_sam.py')!r}]
        data = dict(train={split!r}, val={split!r}, test={split!r})
        model = dict(
            type="DetWrapperInstanceSAM",
            sam=dict(type="TinySAM", checkpoint={str(ckpt)!r}, **{SIZES!r}),
            prompt=dict(type="GTBoxPrompt", ann_file={str(gt)!r}, classes={classes!r}),
            num_classes={len(classes)}, box_chunk=2, use_box_score=False)
        """))
    run = _run(["--config", str(config), "--q_config", str(_w8a8(root)), "--out", str(root / "out"),
                "--cache-dir", str(root / "cache"), "--calib-images", "3"])
    return {"runs": {"fp": run, "w8a8": run}, "fp_dir": root / "out", "w8a8_dir": root / "out",
            "reference": dets, "gt": gt}


def _masks(path: Path) -> list[np.ndarray]:
    return [mask_utils.decode(d["segmentation"]).astype(bool) for d in json.loads(path.read_text())]


def _masks_by_box(path: Path) -> dict[tuple, np.ndarray]:
    """Masks of a COCO result file keyed by (image, category, box), the box being the prompt."""
    return {(d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 2))):
            mask_utils.decode(d["segmentation"]).astype(bool) for d in json.loads(path.read_text())}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("name", ["shapes", "labelme"])
def test_float_masks_and_ap_match_sam_predictor_scored_by_pycocotools(name, request):
    data = request.getfixturevalue(name)
    reference = data["reference"]
    ours = _masks_by_box(data["fp_dir"] / "fp.segm.json")
    assert len(ours) == len(reference) > 0
    assert any(d["mask"].any() and not d["mask"].all() for d in reference)  # masks are not degenerate
    ious = [_iou(ours[(d["image_id"], d["category_id"], d["box"])], d["mask"]) for d in reference]
    assert np.mean(ious) > 0.999
    expected = _reference_ap(data["gt"], reference)
    assert 0.0 < expected < 100.0
    assert data["runs"]["fp"]["fp"]["segm_mAP"] == pytest.approx(expected, abs=0.05 + 1e-9)  # mmdet: 1e-3


@pytest.mark.parametrize("name", ["shapes", "labelme"])
def test_w8a8_masks_agree_with_float_masks(name, request):
    data = request.getfixturevalue(name)
    fp, quant = _masks(data["w8a8_dir"] / "fp.segm.json"), _masks(data["w8a8_dir"] / "quant.segm.json")
    assert len(fp) == len(quant) > 0
    assert np.mean([_iou(a, b) for a, b in zip(fp, quant)]) >= 0.9
    scores = [[d["score"] for d in json.loads((data["w8a8_dir"] / f"{t}.segm.json").read_text())]
              for t in ("fp", "quant")]
    assert scores[0] != scores[1]  # the quantized run really ran quantized
    assert data["runs"]["w8a8"]["calibration"]["reconstruction"] == {"requested": False, "ran": False}


def test_w4a4_config44_runs_the_ahcq_recipe_with_reconstruction(shapes):
    run = shapes["runs"]["w4a4"]
    assert "fp" not in run and run["quant_encoder"] is True
    assert run["qconfig"]["acnr"]["enabled"] and run["qconfig"]["lnq"]["enabled"]
    calibration = run["calibration"]
    assert set(calibration["big"]) == {"mask_decoder.transformer.layers.0.cross_attn_token_to_image",
                                       "mask_decoder.transformer.final_attn_token_to_image"}
    assert any(name.startswith("image_encoder.blocks.") for name in calibration["acnr"])
    recon = calibration["reconstruction"]
    assert recon["requested"] and recon["ran"] and recon["report"]["iters"] == 2
    assert 0.0 <= run["quant"]["segm_mAP"] <= 100.0


def test_pack_writes_the_runs_quantized_model_as_one_integer_file(shapes, ckpt):
    run, path = shapes["runs"]["w4a4"], shapes["root"] / "w4a4" / "quantized.npz"
    assert run["packed"] == {"file": "quantized.npz", "bytes": path.stat().st_size,
                             "fp32_bytes": run["packed"]["fp32_bytes"]}
    assert path.stat().st_size < run["packed"]["fp32_bytes"] / 3  # float parts dominate this small model
    sam, qconfig, quant_encoder = unpack_model(path)
    assert quant_encoder and qconfig.to_dict() == {k: v for k, v in run["qconfig"].items() if k != "path"}
    float_state = torch.load(ckpt, weights_only=True)
    for name in ("image_encoder.pos_embed", "mask_decoder.iou_token.weight"):  # this run's float parts
        assert torch.equal(sam.state_dict()[name], float_state[name])


def test_results_json_is_complete(shapes):
    run = shapes["runs"]["w8a8"]
    for block in ("fp", "quant"):
        assert {"segm_mAP", "bbox_mAP"} <= set(run[block])
    assert run["fp"]["bbox_mAP"] == pytest.approx(100.0)  # oracle boxes are the ground truth
    assert run["qconfig"]["a_qconfig"]["bit"] == 8 and run["seed"] == 0
    assert run["config"]["path"].endswith("tiny_sam_oracle.py") and len(run["config"]["text_sha256"]) == 64
    assert run["boxes"] == {"box_chunk": 32, "calib_max_boxes": 32}
    assert run["images"]["eval"] == 4 and run["images"]["calib"] == 2
    assert {"build", "cache", "fp_eval", "quantize", "quant_eval", "total"} <= set(run["timings_s"])
    assert "quant" not in shapes["runs"]["fp"] and "fp" in shapes["runs"]["fp"]


def test_second_run_reuses_cached_prompts(shapes):
    after_fp, after_w8a8, after_w4a4 = shapes["calls"]
    assert after_fp == 4  # the fp-only run prepares the 4 val images and no calibration image
    assert after_w8a8 == after_fp + 2  # only the 2 calibration images are new
    assert after_w4a4 == after_w8a8  # everything cached: the prompt source never runs again
    assert shapes["runs"]["fp"]["cache"]["eval"] == "miss"
    assert shapes["runs"]["w8a8"]["cache"]["eval"] == "hit"
    assert shapes["runs"]["w4a4"]["cache"] | {"dir": None} == {
        "dir": None, "calib": "hit", "eval": "hit", "prepared": 0}



def test_onnxruntime_backend_evaluates_the_exported_model_beside_the_fake_quant_one(shapes):
    run, folder = shapes["runs"]["w8a8"], shapes["w8a8_dir"]
    assert run["identity"]["backend"] == "onnxruntime"
    assert abs(run["onnxruntime"]["segm_mAP"] - run["quant"]["segm_mAP"]) <= 0.5
    decoder = run["onnx"]["files"]["mask_decoder"]
    assert decoder["ops"]["MatMulIntegerToFloat"] > 0
    assert (folder / decoder["file"]).stat().st_size == decoder["bytes"]
    assert ("image_encoder" in run["onnx"]["files"]) == run["quant_encoder"]  # exported when quantized
    quant, runtime = _masks(folder / "quant.segm.json"), _masks(folder / "onnxruntime.segm.json")
    assert len(quant) == len(runtime) > 0
    assert np.mean([_iou(a, b) for a, b in zip(quant, runtime)]) >= 0.98


def test_onnxruntime_backend_refuses_a_recipe_onnx_cannot_express_before_calibrating(shapes, ckpt,
                                                                                      monkeypatch):
    root = shapes["root"]
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(root / "demo"))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(ckpt.parent))
    args = ["--config", str(REPO / "projects/configs/demo/tiny_sam_oracle.py"), "--cache-dir",
            str(root / "cache"), "--calib-images", "2", "--cfg-options", *_size_options(), "--q_config",
            str(REPO / "exp/ahcptq/w4a4.yaml"), "--backend", "onnxruntime", "--skip-fp", "--out",
            str(root / "refused")]
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):
        main(args)
    message = str(exc.value.code)
    assert "--backend onnxruntime" in message and "HLUQ" in message and "exp/deploy/" in message
    assert not (root / "refused" / "results.json").exists()
