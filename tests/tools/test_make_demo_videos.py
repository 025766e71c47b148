"""The demo video set: SA-V layout the project's reader accepts, seeded, and holding the events the SAM2
testbed is meant to face (disappearance and re-appearance, partial occlusion, scale change, same-class
distractors), checked on the written files or on the drawn clips."""
from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tool_loader import load_tool

from ahcq.data.videos import ClipSpec, draw_clip
from ahcq.video.datasets import read_label_png, read_sav

make_demo_videos = load_tool("make_demo_videos")
SPEC = ClipSpec(frames=16)


def _generate(out: Path, seed: int = 0) -> Path:
    args = ["--out", str(out), "--seed", str(seed), "--num-train", "2", "--num-val", "3", "--frames", "16"]
    assert make_demo_videos.main(args) == 0
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("videos"))


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def test_same_arguments_give_identical_files_and_another_seed_other_clips(videos, tmp_path):
    assert _same_tree(videos, _generate(tmp_path / "again"))
    assert not _same_tree(videos, _generate(tmp_path / "other", seed=1))


def test_every_split_reads_as_sav_with_every_target_prompted_on_the_first_frame(videos):
    for split, count in (("train", 2), ("val", 3)):
        samples = read_sav(videos / split, split)
        assert [s.name for s in samples] == [f"{split}_{i:04d}" for i in range(count)]
        for s in samples:
            assert len(s.frame_paths) == 16 and s.size == (96, 128)
            assert set(s.prompt_frames.values()) == {0}
            assert all(len(s.annotations[obj]) == 16 for obj in s.objects)


def test_the_first_target_of_every_clip_vanishes_behind_the_pillar_and_comes_back(videos):
    for s in read_sav(videos / "val", "val"):
        areas = [int(read_label_png(s.annotations[0][t], s.size).sum()) for t in range(16)]
        gone = [t for t, a in enumerate(areas) if a == 0]
        assert areas[0] > 0 and gone, (s.name, areas)
        assert any(a > 0 for a in areas[gone[0]:]), (s.name, areas)


def test_clips_hold_partial_occlusion_scale_change_and_same_class_distractors():
    for index in range(8):
        clip = draw_clip(SPEC, np.random.default_rng([0, 1, index]))
        partial = False
        for obj in clip.targets:
            visible = [int(m.sum()) for m in obj.masks]
            assert max(obj.full_areas) >= 1.4 * min(obj.full_areas)
            partial |= any(0 < v < full for v, full in zip(visible, obj.full_areas))
        assert partial
        distractors = [o for o in clip.objects if not o.target]
        assert distractors
        for d in distractors:
            assert any((t.category, t.texture) == (d.category, d.texture) for t in clip.targets)
            assert any(m.any() for m in d.masks)
            for t in clip.targets:
                assert not any((m & n).any() for m, n in zip(d.masks, t.masks))


def test_masks_are_the_pixels_the_frame_shows_for_the_target():
    clip = draw_clip(SPEC, np.random.default_rng([0, 0, 5]))
    owner = np.full(clip.frames[0].shape[:2], -1)
    for k, obj in enumerate(clip.objects):
        assert not (owner[obj.masks[3]] >= 0).any()  # no pixel belongs to two objects
        owner[obj.masks[3]] = k
    assert (owner >= 0).any() and (owner < 0).any()


def test_bad_arguments_exit_non_zero_and_a_failed_split_leaves_nothing(tmp_path, monkeypatch):
    for bad in (["--num-val", "0"], ["--seed", "-1"], ["--size", "16", "16"], ["--frames", "2"]):
        with pytest.raises(SystemExit) as err:
            make_demo_videos.main(["--out", str(tmp_path / "bad"), *bad])
        assert err.value.code == 2
    saves = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 20:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_demo_videos.main(["--out", str(tmp_path / "out"), "--num-train", "2", "--num-val", "1"])
    assert list((tmp_path / "out").iterdir()) == []


def test_object_scale_grows_the_free_objects_and_is_range_checked():
    def free_areas(scale: float) -> list[int]:
        spec = ClipSpec(frames=6, object_scale=scale)
        areas = []
        for i in range(12):
            clip = draw_clip(spec, np.random.default_rng([0, 0, i]))
            areas += [o.full_areas[0] for o in clip.objects[1:]]  # [0]: the crosser, sized by the pillar
        return areas
    assert np.mean(free_areas(1.8)) > 2.0 * np.mean(free_areas(1.0))
    with pytest.raises(ValueError, match="object_scale"):
        ClipSpec(object_scale=3.0)
