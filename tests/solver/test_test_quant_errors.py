"""Bad input to test_quant.py: a one-line message naming the culprit, a non-zero exit, no results.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahcq.data.coco_io import categories
from ahcq.data.shapes import CATEGORIES
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.solver.test_quant import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "projects" / "configs" / "demo" / "tiny_sam_oracle.py"
SIZES = dict(img_size=32, embed_dim=16, depth=1, num_heads=1, global_attn_indexes=(0,), out_chans=16,
             decoder_depth=1, decoder_heads=1, decoder_mlp_dim=16, iou_head_hidden_dim=16)
SIZE_OPTIONS = [f"model.sam.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "")
                for k, v in SIZES.items()]


@pytest.fixture
def demo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-image demo set (one annotation in val, none in train) and a random tiny SAM checkpoint, wired in
    through the demo config's variables."""
    root = tmp_path / "demo"
    images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}]
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0,
           "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]}
    for split, anns in (("train", []), ("val", [box])):
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories(CATEGORIES)}))
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / "a.png")
    torch.manual_seed(0)
    torch.save(build_tiny_sam(**SIZES).state_dict(), tmp_path / "tiny_sam.pth")
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(root))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(tmp_path))
    return tmp_path


def _fails(args: list[str], *culprits: str) -> None:
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    with pytest.raises(SystemExit) as exc:
        main(args)
    message = str(exc.value.code)
    assert exc.value.code not in (0, None)
    assert len(message) < 1000
    for culprit in culprits:
        assert culprit in message, message
    if out is not None:
        assert not (out / "results.json").exists()


def test_missing_checkpoint_names_it_and_the_command_that_makes_it(demo_env: Path):
    missing = demo_env / "nowhere" / "tiny_sam.pth"
    _fails(["--config", str(DEMO), "--out", str(demo_env / "out"), "--cfg-options",
            f"model.sam.checkpoint={missing}"], str(missing), "python tools/train_tiny_sam.py")


def test_no_arguments_runs_the_demo_and_names_what_is_missing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AHCQ_CKPT_DIR", raising=False)
    monkeypatch.delenv("AHCQ_DEMO_ROOT", raising=False)
    _fails([], os.path.join("ckpt", "tiny_sam.pth"), "python tools/train_tiny_sam.py",
           "python tools/make_demo_data.py")
    assert not (tmp_path / "runs").exists()


def test_missing_annotations_name_the_file_and_the_demo_data_command(demo_env: Path, monkeypatch):
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(demo_env / "absent"))
    _fails(["--config", str(DEMO), "--out", str(demo_env / "out")], "instances_val.json",
           "python tools/make_demo_data.py")


def test_malformed_yaml_names_the_file(demo_env: Path):
    bad = demo_env / "broken.yaml"
    bad.write_text("a_qconfig: [4, 4\nw_qconfig: {bit: 4}\n")
    _fails(["--config", str(DEMO), "--q_config", str(bad), "--out", str(demo_env / "out")],
           "broken.yaml", "malformed YAML")


def test_unknown_qconfig_key_is_named(demo_env: Path):
    bad = demo_env / "typo.yaml"
    bad.write_text("a_qconfig: {bit: 8}\nw_qconfig: {bit: 8}\nrecon: {enabeld: false}\n")
    _fails(["--config", str(DEMO), "--q_config", str(bad), "--out", str(demo_env / "out")],
           "typo.yaml", "enabeld")


def test_nonexistent_config_is_named(tmp_path: Path):
    _fails(["--config", str(tmp_path / "no_such.py"), "--out", str(tmp_path / "out")], "no_such.py")


def test_calibration_split_without_annotations_is_refused(demo_env: Path):
    _fails(["--config", str(DEMO), "--out", str(demo_env / "out"), "--cfg-options", *SIZE_OPTIONS],
           "data.train")


def test_checkpoint_of_another_model_is_reported_briefly(demo_env: Path):
    _fails(["--config", str(DEMO), "--out", str(demo_env / "out")], "TinySAM",
           "is not a tiny SAM of these sizes", "tiny_sam_oracle.py")


@pytest.mark.parametrize(
    "args", [["--bogus"], ["--limit", "0"], ["--device", "tpu"], ["--fp-only", "--skip-fp"]]
)
def test_bad_options_exit_with_usage_error(args: list[str], tmp_path: Path):
    _fails([*args, "--out", str(tmp_path / "out")])


def test_script_exits_nonzero_without_traceback(tmp_path: Path):
    missing = tmp_path / "missing.py"
    proc = subprocess.run([sys.executable, "ahcq/solver/test_quant.py", "--config", str(missing)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_onnxruntime_backend_needs_a_quantized_model_on_cpu(demo_env: Path):
    base = ["--config", str(DEMO), "--backend", "onnxruntime", "--out", str(demo_env / "out"),
            "--cfg-options", *SIZE_OPTIONS]
    _fails(["--fp-only", *base], "--backend onnxruntime", "--fp-only")
