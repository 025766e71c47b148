"""Every config under projects/configs loads, takes its paths from the environment, builds its detector."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mmcv
import pytest
from mmdet.datasets import CocoDataset
from mmdet.models import DETECTORS, build_detector
from plugin_helpers import CONFIGS, REPO, small_sam

import ahcq.data.shapes as shapes
from projects.instance_segment_anything import (
    DetectionFilePrompt,
    DetWrapperInstanceSAM,
    GTBoxPrompt,
    MMDetPrompt,
)

ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.py"))
SAM_CONFIGS = [
    f"{folder}/{prefix}-sam-vit-{size}.py"
    for folder, prefix in [
        ("faster_rcnn", "faster_rcnn"),
        ("yolox", "yolo_l"),
        ("hdetr", "hdetr"),
        ("focalnet_dino", "focalnet_dino"),
    ]
    for size in "blh"
]
DETECTOR_CONFIGS = [p for p in ALL if p.startswith("detectors/")]


def _empty_coco(root: Path, splits: tuple[str, ...], classes: tuple[str, ...]) -> None:
    """``root/annotations/instances_<split>.json`` with no images, only the categories ``classes``."""
    annotations = root / "annotations"
    annotations.mkdir(parents=True)
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    for split in splits:
        (annotations / f"instances_{split}.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": cats})
        )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every path variable at a scratch tree holding just enough files for the file-based prompts."""
    _empty_coco(tmp_path / "coco", ("train2017", "val2017"), CocoDataset.CLASSES)
    _empty_coco(tmp_path / "demo", ("train", "val"), shapes.CATEGORIES)
    dets = tmp_path / "dets"
    dets.mkdir()
    for name in ("hdetr_r50", "focalnet_dino_l"):
        for split in ("train2017", "val2017"):
            (dets / f"{name}_{split}.bbox.json").write_text("[]")
    for var, sub in [
        ("AHCQ_DATA_ROOT", "coco"),
        ("AHCQ_DEMO_ROOT", "demo"),
        ("AHCQ_DET_DIR", "dets"),
        ("AHCQ_CKPT_DIR", "weights"),
    ]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_the_reference_config_names_are_all_there():
    assert set(SAM_CONFIGS + ["demo/tiny_sam_oracle.py", "_base_/coco_instance_sam.py"]) <= set(ALL)
    assert len(DETECTOR_CONFIGS) == 3


@pytest.mark.parametrize("name", ALL)
def test_config_text_has_no_absolute_path(name):
    text = (CONFIGS / name).read_text()
    assert not re.search(r"""['"](/|[A-Za-z]:\\)""", text), f"{name} writes an absolute path"


def test_base_config_reads_coco_from_the_environment(env):
    cfg = mmcv.Config.fromfile(str(CONFIGS / "_base_" / "coco_instance_sam.py"))
    assert cfg.data.test.ann_file == str(env / "coco" / "annotations" / "instances_val2017.json")
    assert cfg.data.train.img_prefix.startswith(str(env / "coco" / "train2017"))
    assert cfg.custom_imports.imports == ["projects.instance_segment_anything"]


SAM2_CONFIGS = ["yolox/yolo_l-sam2.1-hiera-t.py", "demo/tiny_sam2_oracle.py"]


@pytest.mark.parametrize("name", [*SAM_CONFIGS, "demo/tiny_sam_oracle.py", *SAM2_CONFIGS])
def test_sam_config_loads_with_paths_from_the_environment(name, env):
    cfg = mmcv.Config.fromfile(str(CONFIGS / name))
    assert cfg.model.type == "DetWrapperInstanceSAM"
    assert cfg.plugin is True and (CONFIGS.parents[1] / cfg.plugin_dir).is_dir()
    assert cfg.data.samples_per_gpu == 1
    root = env / ("demo" if name.startswith("demo/") else "coco")
    for split in ("train", "val", "test"):
        assert cfg.data[split].ann_file.startswith(str(root)) and cfg.data[split].img_prefix.startswith(
            str(root)
        )
    assert cfg.model.sam.checkpoint.startswith(str(env / "weights"))
    size = re.search(r"vit-([blh])\.py$", name)
    if size:
        assert cfg.model.sam.model_type == f"vit_{size.group(1)}"
        assert cfg.model.num_classes == 80
    prompt = cfg.model.prompt
    for key in ("det_file", "ann_file", "checkpoint"):
        value = prompt.get(key)
        for path in [value] if isinstance(value, str) else list(value or []):
            assert path.startswith(str(env)), f"{name}: model.prompt.{key} {path} ignores the environment"


@pytest.mark.parametrize("name", [n for n in SAM_CONFIGS if not n.endswith("vit-b.py")])
def test_large_sam_configs_differ_from_vit_b_in_sam_only(name, env):
    cfg = mmcv.Config.fromfile(str(CONFIGS / name)).to_dict()
    base = mmcv.Config.fromfile(str(CONFIGS / re.sub(r"vit-[lh]\.py$", "vit-b.py", name))).to_dict()
    assert cfg["model"].pop("sam") != base["model"].pop("sam")
    assert cfg == base


@pytest.mark.parametrize(
    "name",  # the l/h variants of detector-prompted configs build the same (costly) detector as vit-b
    [n for n in SAM_CONFIGS if n.endswith("vit-b.py") or n.startswith(("hdetr/", "focalnet_dino/"))]
    + ["demo/tiny_sam_oracle.py"],
)
def test_sam_config_builds_with_a_small_random_sam(name, env):
    cfg = mmcv.Config.fromfile(str(CONFIGS / name))
    model_cfg = cfg.model.copy()
    model_cfg.sam = small_sam()
    if model_cfg.prompt.type == "MMDetPrompt":
        if not Path(model_cfg.prompt.config).is_file():
            pytest.skip(f"mmdet package ships no configs ({model_cfg.prompt.config})")
        model_cfg.prompt.checkpoint = None
    model = build_detector(model_cfg)
    assert isinstance(model, DetWrapperInstanceSAM)
    expected = {
        "MMDetPrompt": MMDetPrompt,
        "DetectionFilePrompt": DetectionFilePrompt,
        "GTBoxPrompt": GTBoxPrompt,
    }
    assert type(model.prompt) is expected[cfg.model.prompt.type]
    assert model.num_classes == len(cfg.data.test.get("classes") or CocoDataset.CLASSES)


@pytest.mark.parametrize("name", DETECTOR_CONFIGS)
def test_detector_config_loads_an_mmdet_detector(name):
    cfg = mmcv.Config.fromfile(str(CONFIGS / name))
    assert cfg.model.type in DETECTORS
    assert cfg.data.test.pipeline[0].type == "LoadImageFromFile"


def test_sam2_configs_differ_from_their_sam_configs_in_sam_only(env):
    for sam2, sam in zip(SAM2_CONFIGS, ["yolox/yolo_l-sam-vit-b.py", "demo/tiny_sam_oracle.py"]):
        cfg = mmcv.Config.fromfile(str(CONFIGS / sam2)).to_dict()
        base = mmcv.Config.fromfile(str(CONFIGS / sam)).to_dict()
        assert cfg["model"].pop("sam")["type"] in ("OfficialSAM2", "TinySAM2")
        base["model"].pop("sam")
        assert cfg == base


def test_missing_sam_weights_are_named(env):
    cfg = mmcv.Config.fromfile(str(CONFIGS / "hdetr" / "hdetr-sam-vit-l.py"))
    with pytest.raises(FileNotFoundError, match="sam_vit_l_0b3195.pth"):
        build_detector(cfg.model)


@pytest.mark.slow  # a fresh interpreter must import torch and mmdet first (tens of seconds)
def test_plugin_dir_import_registers_everything_in_a_fresh_interpreter():
    """What mmdet-style loaders do with ``plugin_dir``, in a process where nothing was imported yet."""
    script = (
        "import importlib, mmcv\n"
        f"cfg = mmcv.Config.fromfile({str(CONFIGS / '_base_' / 'coco_instance_sam.py')!r}, "
        "import_custom_modules=False)\n"
        "from mmdet.models import DETECTORS\n"
        "assert DETECTORS.get('DetWrapperInstanceSAM') is None\n"
        "plugin = importlib.import_module(cfg.plugin_dir.rstrip('/').replace('/', '.'))\n"
        "assert DETECTORS.get('DetWrapperInstanceSAM') is plugin.DetWrapperInstanceSAM\n"
        "print(sorted(plugin.PROMPT_SOURCES.module_dict), sorted(plugin.SAM_BUILDERS.module_dict))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "['DetectionFilePrompt',",
        "'GTBoxPrompt',",
        "'MMDetPrompt']",
        "['OfficialSAM',",
        "'OfficialSAM2',",
        "'RandomSAM',",
        "'TinySAM',",
        "'TinySAM2']",
    ]
