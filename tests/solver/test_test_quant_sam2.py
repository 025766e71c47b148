"""test_quant.py with a SAM2 (the image model of a reduced SAM 2.1 Hiera-T, random weights) on generated
shapes: float masks against sam2's own ``SAM2ImagePredictor``, the AHCQ-SAM recipe quantizing and
reconstructing SAM2 with its memory modules float, and what the SAM2 image path refuses."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from sam2.sam2_image_predictor import SAM2ImagePredictor
from tool_loader import load_tool

from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
from ahcq.solver.test_quant import main

REPO = Path(__file__).resolve().parents[2]
REDUCED = dict(image_size=64, embed_dim=16, d_model=32, mem_dim=16, ffn_dim=64)
CONFIG = REPO / "projects/configs/demo/tiny_sam2_oracle.py"
make_demo_data = load_tool("make_demo_data")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A random reduced SAM2 saved as the testbed is (sam2 format + sidecar) and 3 train / 4 val images."""
    root = tmp_path_factory.mktemp("sam2_images")
    torch.manual_seed(1)
    model = build_sam2_model("t", reduced_overrides(**REDUCED))
    torch.save({"model": model.state_dict()}, root / "tiny_sam2.pt")
    (root / "tiny_sam2.json").write_text(json.dumps(
        {"model": {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "reduced": REDUCED}}))
    make_demo_data.generate(root / "demo", seed=5, num_train=3, num_val=4, size=64)
    recipe = root / "config44_short.yaml"
    recipe.write_text(f"base: {REPO / 'exp' / 'config44.yaml'}\nrecon: {{iters: 1}}\n")
    return {"root": root, "model": model, "recipe": recipe}


def _main(setup: dict, args: list[str]) -> int:
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("AHCQ_DEMO_ROOT", str(setup["root"] / "demo"))
        mp.setenv("AHCQ_CKPT_DIR", str(setup["root"]))
        return main(["--config", str(CONFIG), "--cache-dir", str(setup["root"] / "cache"), "--calib-images",
                     "2", *args])


@pytest.fixture(scope="module")
def runs(setup) -> dict:
    out = setup["root"] / "w4a4"
    assert _main(setup, ["--q_config", str(setup["recipe"]), "--out", str(out)]) == 0
    return {"dir": out, "results": json.loads((out / "results.json").read_text())}


def _reference_masks(setup: dict) -> dict[tuple, np.ndarray]:
    """SAM2ImagePredictor's mask for every val GT box, keyed by (image id, rounded xywh box)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(setup["root"] / "demo/annotations/instances_val.json"))
    predictor = SAM2ImagePredictor(setup["model"])
    side = REDUCED["image_size"]
    predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
    out = {}
    for info in gt.dataset["images"]:
        anns = [a for a in gt.imgToAnns[info["id"]] if a["area"] > 0]
        if not anns:
            continue
        predictor.set_image(np.asarray(mmcv.imread(str(setup["root"] / "demo/val" / info["file_name"]),
                                                   channel_order="rgb")))
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        masks, _, _ = predictor.predict(box=xyxy, multimask_output=False)
        for a, m in zip(anns, masks.reshape(len(anns), *masks.shape[-2:])):
            out[(info["id"], tuple(np.round(a["bbox"], 2)))] = m.astype(bool)
    return out


def test_float_masks_are_sam2_image_predictors(setup, runs) -> None:
    reference = _reference_masks(setup)
    ours = {(d["image_id"], tuple(np.round(d["bbox"], 2))): mask_utils.decode(d["segmentation"]).astype(bool)
            for d in json.loads((runs["dir"] / "fp.segm.json").read_text())}
    assert len(ours) == len(reference) > 0
    assert all(np.array_equal(ours[k], m) for k, m in reference.items())


def test_ahcq_recipe_quantizes_and_reconstructs_sam2_with_its_memory_float(runs) -> None:
    run = runs["results"]
    assert run["quant_encoder"] is True and 0.0 <= run["quant"]["segm_mAP"] <= 100.0
    calibration = run["calibration"]
    assert calibration["big"] and all(name.startswith("sam_mask_decoder.") for name in calibration["big"])
    assert any(name.startswith("image_encoder.trunk.") for name in calibration["acnr"])
    recon = calibration["reconstruction"]
    names = recon["report"]["unit_names"]
    assert recon["ran"] and any(n.startswith("image_encoder.trunk.") for n in names)
    assert any(n.startswith("sam_mask_decoder.transformer.") for n in names)
    assert not any(n.startswith("memory_") for n in names)
    fp = json.loads((runs["dir"] / "fp.segm.json").read_text())
    quant = json.loads((runs["dir"] / "quant.segm.json").read_text())
    assert len(fp) == len(quant) and [d["score"] for d in fp] != [d["score"] for d in quant]


@pytest.mark.parametrize(("args", "message"), [
    (["--pack"], "--pack: the packed format holds SAM"),
    (["--backend", "onnxruntime"], "--backend onnxruntime: the ONNX export covers SAM"),
    (["--q_config", str(REPO / "exp/saqsam/w4a4.yaml")], "PCC is defined on SAM's decoder"),
])
def test_sam2_refuses_what_its_image_path_lacks(setup, args, message) -> None:
    out = setup["root"] / "refused"
    with pytest.raises(SystemExit) as exc:
        _main(setup, [*args, "--out", str(out)])
    assert message in str(exc.value.code)
    assert not out.exists()
