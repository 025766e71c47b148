"""Tracking with sam2's video predictor on real clips: protocol, late objects, limits, and scoring.

The model is a reduced SAM 2.1 Hiera-T with random weights (no weights ship offline), so tests assert what
holds for any weights: the prompt frame returns the GT mask (sam2 uses a mask prompt as the output), objects
are tracked independently so the joint run equals one run per object through sam2's own API, and nothing
is predicted for an object before its prompt frame.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vos_benchmark.benchmark import benchmark

from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
from ahcq.video import evaluate, read_davis, read_sav, write_masks
from ahcq.video.datasets import VideoSample
from ahcq.video.fixtures import labelme_clip_to_layout, make_moving_shapes_clip
from ahcq.video.propagation import TrackOptions, predict_videos, track_sample

TINY = [*reduced_overrides(image_size=128), "++model.memory_attention.num_layers=1",
        "++model.fill_hole_area=0"]


def tiny_predictor(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam2_model("t", TINY, video=True)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def predictor() -> torch.nn.Module:
    return tiny_predictor()


@pytest.fixture(scope="module")
def late_clip(tmp_path_factory: pytest.TempPathFactory) -> VideoSample:
    """5 frames, 2 objects; object 1's first two annotations are blank, so it is prompted on frame 2."""
    root = tmp_path_factory.mktemp("late")
    make_moving_shapes_clip(root, "sav", n_frames=5, size=(72, 96), n_objects=2, seed=1)
    for frame in ("00000", "00001"):
        Image.fromarray(np.zeros((72, 96), np.uint8), "L").save(
            root / "Annotations_6fps" / "shapes" / "001" / f"{frame}.png")
    sample = read_sav(root)[0]
    assert sample.prompt_frames == {0: 0, 1: 2}
    return sample


def single_object_run(predictor: torch.nn.Module, sample: VideoSample, obj: int) -> dict[int, np.ndarray]:
    """One object alone, straight through sam2's API: fresh state, its GT mask, propagate from there."""
    frame, mask = sample.prompt(obj)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = predictor.init_state(str(sample.frames_dir))
        predictor.add_new_mask(state, frame_idx=frame, obj_id=obj, mask=mask)
        return {f: (torch.sigmoid(logits[0, 0]) > 0.5).numpy()
                for f, _, logits in predictor.propagate_in_video(state, start_frame_idx=frame)}


def test_joint_tracking_equals_one_run_per_object(predictor, late_clip) -> None:
    joint = track_sample(predictor, late_clip)
    assert sorted(joint) == [0, 1, 2, 3, 4]
    assert [sorted(joint[f]) for f in range(5)] == [[0], [0], [0, 1], [0, 1], [0, 1]]
    for obj in late_clip.objects:
        alone = single_object_run(predictor, late_clip, obj)
        assert sorted(alone) == [f for f in joint if obj in joint[f]]
        for frame, mask in alone.items():
            assert mask.shape == late_clip.size
            assert np.array_equal(joint[frame][obj], mask), (obj, frame)


def test_prompt_frame_returns_the_ground_truth_mask(predictor, late_clip) -> None:
    joint = track_sample(predictor, late_clip)
    for obj in late_clip.objects:
        frame, gt = late_clip.prompt(obj)
        assert iou(joint[frame][obj], gt) > 0.9  # only the 128 px round trip blurs the edges
    tracked = joint[4][0]
    assert 0 < tracked.sum() < tracked.size  # a real tracked mask, neither empty nor everything


def test_max_frames_keep_and_threshold(predictor, late_clip) -> None:
    short = track_sample(predictor, late_clip, TrackOptions(max_frames=1))
    assert sorted(short) == [0, 1] and all(sorted(m) == [0] for m in short.values())
    full = track_sample(predictor, late_clip)
    assert np.array_equal(short[1][0], full[1][0])
    kept = track_sample(predictor, late_clip, keep={1, 3})
    assert sorted(kept) == [1, 3]
    assert all(np.array_equal(kept[f][o], full[f][o]) for f in kept for o in kept[f])
    strict = track_sample(predictor, late_clip, TrackOptions(threshold=0.99))
    loose = track_sample(predictor, late_clip, TrackOptions(threshold=0.01))
    for frame in (3, 4):
        assert not np.any(strict[frame][0] & ~full[frame][0])
        assert not np.any(full[frame][0] & ~loose[frame][0])
    with pytest.raises(ValueError, match="threshold"):
        TrackOptions(threshold=1.5)
    with pytest.raises(ValueError, match="max_frames"):
        TrackOptions(max_frames=-1)


def test_frame_mismatch_names_the_video(predictor, late_clip, tmp_path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in late_clip.frame_paths[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    short = VideoSample("cut", late_clip.layout, tuple(folder / p.name for p in late_clip.frame_paths),
                        late_clip.size, late_clip.annotations, late_clip.prompt_frames)
    with pytest.raises(ValueError, match="video 'cut': the predictor loaded 3 frames"):
        track_sample(predictor, short)


def _palette(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """What a DAVIS palette PNG keeps of overlapping masks: the higher id wins."""
    out, taken = {}, None
    for obj in sorted(masks, reverse=True):
        out[obj] = masks[obj] if taken is None else masks[obj] & ~taken
        taken = masks[obj] if taken is None else taken | masks[obj]
    return out


def test_tracked_predictions_score_like_vos_benchmark(predictor, tmp_path) -> None:
    """The in-memory predictions, written as palette PNGs, get vos-benchmark's J&F from ``evaluate``."""
    root = tmp_path / "davis"
    for seed in (4, 5):
        make_moving_shapes_clip(root, "davis", n_frames=5, size=(72, 96), n_objects=2, seed=seed,
                                video=f"v{seed}")
    samples = read_davis(root)
    predictions = predict_videos(predictor, samples, progress=False)
    resolved = {v: {f: _palette(m) for f, m in frames.items()} for v, frames in predictions.items()}
    pred_root = tmp_path / "pred"
    for s in samples:
        for frame, name in enumerate(s.frame_names):
            write_masks(pred_root / s.name, "davis", name, resolved[s.name].get(frame, {}), s.size)
    report = evaluate(samples, resolved)
    gt_root = root / "Annotations" / "480p"
    jf, j, f, _ = benchmark([str(gt_root)], [str(pred_root)], strict=True, num_processes=1, verbose=False,
                            skip_first_and_last=True)
    assert report.official.count == 4
    assert report.official.j == pytest.approx(j[0], rel=1e-12, abs=1e-12)
    assert report.official.f == pytest.approx(f[0], rel=1e-12, abs=1e-12)
    assert report.official.jf == pytest.approx(jf[0], rel=1e-12, abs=1e-12)


def test_real_labelme_clip(predictor, labelme_dir: Path, tmp_path) -> None:
    """The 5-frame street clip (car and truck): every object is tracked from its prompt frame to the end."""
    labelme_clip_to_layout(labelme_dir, tmp_path, "sav")
    sample = read_sav(tmp_path)[0]
    masks = track_sample(predictor, sample)
    last = len(sample.frame_paths) - 1
    for obj in sample.objects:
        frame, gt = sample.prompt(obj)
        assert iou(masks[frame][obj], gt) > 0.8
        assert all(obj in masks[f] for f in range(frame, last + 1))
        assert all(obj not in masks.get(f, {}) for f in range(frame))
    report = evaluate([sample], {sample.name: masks})
    assert 0.0 <= report.official.jf <= 100.0 and report.ahcq.count > 0
