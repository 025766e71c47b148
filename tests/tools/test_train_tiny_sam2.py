"""The SAM2 testbed trainers run a few real steps and write what the loaders read: the video trainer a
checkpoint whose sidecar records the J&F of the saved file and that resumes step for step, the image trainer
one that ``TinySAM2`` builds."""
from __future__ import annotations

import json

import torch
import yaml
from tool_loader import load_tool

from ahcq.models.sam2_checkpoint import load_sam2, run_overrides
from projects.instance_segment_anything.sam_builders import TinySAM2

make_demo_videos = load_tool("make_demo_videos")
make_demo_data = load_tool("make_demo_data")
train_tiny_sam2 = load_tool("train_tiny_sam2")
train_tiny_sam2_images = load_tool("train_tiny_sam2_images")
MODEL = {"config": "configs/sam2.1/sam2.1_hiera_t.yaml",
         "reduced": {"image_size": 64, "embed_dim": 16, "d_model": 32, "mem_dim": 16, "ffn_dim": 64}}


def _config(tmp_path) -> str:
    make_demo_videos.generate_split(tmp_path / "clips", "train", 2, 0, make_demo_videos.ClipSpec())
    make_demo_videos.generate_split(tmp_path / "clips", "val", 1, 1, make_demo_videos.ClipSpec())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "dataset": {"root": str(tmp_path / "clips" / "val"),
                                                                 "layout": "sav", "split": "val"}}))
    return str(path)


def test_video_trainer_writes_a_loadable_scored_checkpoint_and_stops_where_told(tmp_path) -> None:
    config = _config(tmp_path)
    out = tmp_path / "tiny_sam2.pt"
    args = ["--config", config, "--train-root", str(tmp_path / "clips" / "train"), "--steps", "8",
            "--until", "2", "--frames", "3", "--eval-every", "100", "--out", str(out)]
    assert train_tiny_sam2.main(args) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["steps"] == 2 and sidecar["model"] == MODEL
    assert 0.0 <= sidecar["val"]["official/J&F"] <= 100.0 and sidecar["val"]["videos"] == 1
    first = load_sam2(MODEL["config"], out, run_overrides(MODEL), video=True).state_dict()
    assert train_tiny_sam2.main([*args[:-2], "--until", "3", "--resume", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["steps"] == 3
    later = load_sam2(MODEL["config"], out, run_overrides(MODEL), video=True).state_dict()
    assert any(not torch.equal(first[k], later[k]) for k in first)  # the resumed run trained on


def test_image_trainer_writes_what_tiny_sam2_builds(tmp_path) -> None:
    config = _config(tmp_path)
    make_demo_data.generate(tmp_path / "demo", seed=5, num_train=3, num_val=0, size=64)
    out = tmp_path / "tiny_sam2_images.pt"
    assert train_tiny_sam2_images.main(["--config", config, "--data", str(tmp_path / "demo"), "--steps", "5",
                                        "--until", "3", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["steps"] == 3 and sidecar["model"] == MODEL and sidecar["init"] is None
    assert TinySAM2(out).image_size == 64
