"""Checks a run makes before its first expensive step, each failing with one line that names the culprit."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mmcv
import torch
from torch import nn

__all__ = ["RunInputError", "check_annotations", "check_config_files", "check_finite_weights",
           "check_folder", "check_image_files"]

TINY_SAM_HINT = "make it with: python tools/make_demo_data.py && python tools/train_tiny_sam.py --out {ckpt}"
DEMO_DATA_HINT = "generate the demo set with: python tools/make_demo_data.py"


class RunInputError(Exception):
    """An input of the run is missing or unusable; the message names it."""


def check_folder(path: Path | None, option: str) -> None:
    """``path`` (a folder the run writes to) must not be a file, nor sit under one."""
    if path is None:
        return
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise RunInputError(f"{option} {path}: {p} is a file, not a folder")
            return


def check_config_files(cfg: mmcv.Config, config: Path) -> None:
    """The SAM checkpoint and the annotation files the mmdet config names, with the command that makes the
    demo's ones."""
    sam = cfg.model.get("sam")
    ckpt = sam.get("checkpoint") if isinstance(sam, dict) else None
    if ckpt is not None and not os.path.isfile(ckpt):
        hint = TINY_SAM_HINT.format(ckpt=ckpt) if sam.get("type") == "TinySAM" else "see ckpt/README.md"
        raise RunInputError(f"SAM checkpoint not found: {ckpt!r} (model.sam.checkpoint of {config}); {hint}")
    for split in ("test", "calib" if "calib" in cfg.data else "train"):
        ann = cfg.data.get(split, {}).get("ann_file")
        if ann is None:
            raise RunInputError(f"--config {config}: data.{split}.ann_file is not set")
        if not os.path.isfile(ann):
            hint = f"; {DEMO_DATA_HINT}" if "demo_root" in cfg else ""
            raise RunInputError(f"annotations not found: {ann!r} (data.{split}.ann_file){hint}")


@torch.no_grad()
def check_finite_weights(module: nn.Module, what: str) -> None:
    """Every parameter and buffer of ``module`` is finite; the first one that is not is named."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise RunInputError(f"{what}: tensor {name!r} holds {bad} NaN/Inf value(s)")


def _image_path(dataset: Any, info: dict[str, Any]) -> str:
    prefix = getattr(dataset, "img_prefix", None) or ""
    return os.path.join(prefix, info["filename"])


def check_image_files(dataset: Any, split: str) -> None:
    """Every image the annotation set lists exists (a missing one would fail halfway through the run)."""
    paths = (_image_path(dataset, info) for info in dataset.data_infos)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RunInputError(f"data.{split}: {len(missing)} of {len(dataset.data_infos)} image file(s) listed "
                            f"in {getattr(dataset, 'ann_file', 'the annotations')} are missing, e.g. "
                            f"{missing[0]!r}")


def check_annotations(dataset: Any, split: str) -> None:
    """An evaluation set without any annotation would score nothing (mAP of no ground truth)."""
    coco = getattr(dataset, "coco", None)
    if coco is not None and not coco.anns:
        source = getattr(dataset, "ann_file", "the annotation file")
        raise RunInputError(f"data.{split}: {source} lists {len(dataset.data_infos)} image(s) but no "
                            f"annotation; there is nothing to score")
