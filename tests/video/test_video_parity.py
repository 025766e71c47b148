"""Official J&F against vos-benchmark, and the pooled AHCQ-SAM J&F against a plain loop, on real files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from vos_benchmark.benchmark import benchmark
from vos_benchmark.utils import _seg2bmap

from ahcq.video import VideoSample, evaluate, read_davis, read_sav, write_masks
from ahcq.video.fixtures import labelme_clip_to_layout
from ahcq.video.metrics import ahcq_scores, boundary_map

Masks = dict[int, dict[int, np.ndarray]]


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate with zero fill (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


def _perturb(sample: VideoSample) -> Masks:
    """Per frame, per object: object 0 shifted, object 1 eroded, object 2 dilated but missing on some
    frames; overlaps resolved like a palette PNG (higher id wins) so every layout holds the same masks."""
    preds = {}
    for frame in range(len(sample.frame_paths)):
        masks = {}
        for rank, (obj, gt) in enumerate(sorted(sample.gt_masks(frame).items())):
            if rank == 0:
                masks[obj] = _shift(gt, 2, -3)
            elif rank == 1:
                masks[obj] = ndimage.binary_erosion(gt, iterations=2)
            else:
                masks[obj] = np.zeros_like(gt) if frame in (3, 4, 7) else ndimage.binary_dilation(gt)
        taken = np.zeros(sample.size, bool)
        for obj in sorted(masks, reverse=True):
            masks[obj] &= ~taken
            taken |= masks[obj]
        preds[frame] = masks
    return preds


def _write(pred_root: Path, sample: VideoSample, preds: Masks, layout: str) -> None:
    for frame, masks in preds.items():
        write_masks(pred_root / sample.name, layout, sample.frame_names[frame], masks, sample.size)


def _vos(gt_dir: Path, pred_dir: Path) -> tuple[float, float, float, dict]:
    jf, j, f, per_object = benchmark([str(gt_dir)], [str(pred_dir)], strict=True, num_processes=1,
                                     verbose=False, skip_first_and_last=True)
    return jf[0], j[0], f[0], per_object[0]


def _assert_same(report, reference: tuple[float, float, float, dict], id_offset: int = 0) -> None:
    jf, j, f, per_object = reference
    assert report.official.j == pytest.approx(j, rel=1e-12, abs=1e-12)
    assert report.official.f == pytest.approx(f, rel=1e-12, abs=1e-12)
    assert report.official.jf == pytest.approx(jf, rel=1e-12, abs=1e-12)
    expected = {(video, obj - id_offset): (ious[obj], fs[obj])
                for video, (ious, fs) in per_object.items() for obj in ious}
    assert report.per_object.keys() == expected.keys()
    for key, (oj, of) in expected.items():
        assert report.per_object[key] == pytest.approx((oj, of), rel=1e-12, abs=1e-12)


def _late_object_video(root: Path) -> None:
    """A DAVIS video where object 2 shows up on frame 3, object 1 leaves the GT on frame 4 and object 3 is
    visible on the (unscored) first frame only: exercises which objects and frames enter the official mean."""
    size, n = (40, 50), 7
    frames = root / "JPEGImages" / "480p" / "late"
    frames.mkdir(parents=True)
    for t in range(n):
        Image.new("RGB", size[::-1], (t * 30, 90, 120)).save(frames / f"{t:05d}.jpg")
        gt = {1: np.zeros(size, bool) if t == 4 else _square(size, 5 + t, 5, 8)}
        if t >= 3:
            gt[2] = _square(size, 20, 20 + t, 10)
        if t == 0:
            gt[3] = _square(size, 30, 2, 6)
        write_masks(root / "Annotations" / "480p" / "late", "davis", f"{t:05d}", gt)


def _square(size: tuple[int, int], r: int, c: int, side: int) -> np.ndarray:
    m = np.zeros(size, bool)
    m[r:r + side, c:c + side] = True
    return m


def test_boundary_map_equals_reference_seg2bmap(rng: np.random.Generator) -> None:
    for shape in [(1, 1), (3, 7), (31, 17)]:
        for density in (0.1, 0.5, 0.9):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(boundary_map(mask), _seg2bmap(mask.copy()).astype(bool))


def test_official_equals_vos_benchmark_on_generated_clip(shapes_roots: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """DAVIS palette GT + predictions, and the same clip as SA-V per-object PNGs, give vos-benchmark's J&F."""
    davis = read_davis(shapes_roots["davis"])
    _late_object_video(tmp_path / "late")
    davis += read_davis(tmp_path / "late")
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for sample in davis:
        (gt_dir / sample.name).symlink_to(sample.annotations[sample.objects[0]][0].parent)
    preds = {}
    for sample in davis:
        preds[sample.name] = _perturb(sample)
        if sample.name == "late":
            preds["late"][2][2] = _square(sample.size, 20, 21, 10)
            preds["late"][1][3] = _square(sample.size, 30, 30, 5)
        _write(tmp_path / "pred_davis", sample, preds[sample.name], "davis")
    reference = _vos(gt_dir, tmp_path / "pred_davis")
    assert 30 < reference[0] < 95

    _assert_same(evaluate(davis, tmp_path / "pred_davis"), reference)
    _assert_same(evaluate(davis, preds), reference)

    sav = read_sav(shapes_roots["sav"])
    _write(tmp_path / "pred_sav", sav[0], {f: {o - 1: m for o, m in ms.items()}
                                           for f, ms in preds["shapes"].items()}, "sav")
    shapes_only = {k: v for k, v in reference[3].items() if k == "shapes"}
    per_obj = np.array([[ious[o], fs[o]] for ious, fs in shapes_only.values() for o in ious])
    report = evaluate(sav, tmp_path / "pred_sav")
    _assert_same(report, (per_obj.mean(0).sum() / 2, *per_obj.mean(0), shapes_only), id_offset=1)


def test_official_equals_vos_benchmark_on_labelme_clip(labelme_dir: Path, tmp_path: Path) -> None:
    """Real street clip, prediction = GT shifted by 3 px down and right; the research notes measured
    J&F 94.99, J 92.81, F 97.18 for this case with vos-benchmark."""
    labelme_clip_to_layout(labelme_dir, tmp_path / "gt", "davis")
    samples = read_davis(tmp_path / "gt")
    sample = samples[0]
    preds = {sample.name: {f: {o: _shift(m, 3, 3) for o, m in sample.gt_masks(f).items()}
                           for f in range(len(sample.frame_paths))}}
    _write(tmp_path / "pred", sample, preds[sample.name], "davis")
    reference = _vos(tmp_path / "gt" / "Annotations" / "480p", tmp_path / "pred")
    report = evaluate(samples, tmp_path / "pred")
    _assert_same(report, reference)
    assert (report.official.jf, report.official.j, report.official.f) == pytest.approx((94.99, 92.81, 97.18),
                                                                                         abs=0.005)


def test_ahcq_pooled_over_object_frames(shapes_roots: dict[str, Path], tmp_path: Path) -> None:
    """Plain loop over every (object, frame) pair of SA-V annotations, first/last skipped (>= 3 frames)."""
    sample = read_sav(shapes_roots["sav"])[0]
    preds = _perturb(sample)
    _write(tmp_path / "pred", sample, preds, "sav")
    js, fs = [], []
    for obj in sample.objects:
        for frame in sample.annotated_frames(obj)[1:-1]:
            j, f = ahcq_scores(preds[frame][obj], sample.gt_mask(obj, frame))
            js.append(j)
            fs.append(f)
    report = evaluate([sample], tmp_path / "pred")
    assert report.ahcq.count == len(js) == 3 * 8
    assert report.ahcq.j == pytest.approx(100 * np.mean(js), rel=1e-12)
    assert report.ahcq.f == pytest.approx(100 * np.mean(fs), rel=1e-12)


def test_ahcq_davis_scores_only_frames_where_the_object_is_visible(tmp_path: Path) -> None:
    """Object 1 (absent on frame 4) scores frames 1, 2, 3, 5; object 2 (visible on 3..6) frames 4, 5;
    object 3, visible on frame 0 only, keeps that single frame."""
    _late_object_video(tmp_path)
    sample = read_davis(tmp_path)[0]
    gts = {f: sample.gt_masks(f) for f in range(7)}
    report = evaluate([sample], {"late": gts})
    assert report.ahcq.count == 4 + 2 + 1
    assert report.ahcq.j == report.ahcq.f == 100.0
    assert sample.prompt_frames == {1: 0, 2: 3, 3: 0}


def test_short_objects_count_only_in_ahcq(tmp_path: Path) -> None:
    """Two annotated frames: the official rule leaves nothing to score, AHCQ-SAM keeps both."""
    frames = tmp_path / "JPEGImages_24fps" / "v"
    frames.mkdir(parents=True)
    for t in range(2):
        Image.new("RGB", (20, 10)).save(frames / f"{t:05d}.jpg")
        write_masks(tmp_path / "Annotations_6fps" / "v", "sav", f"{t:05d}", {0: _square((10, 20), 2, 2, 4)})
    sample = read_sav(tmp_path)[0]
    report = evaluate([sample], {})
    assert report.official.count == 0 and np.isnan(report.official.j)
    assert report.ahcq.count == 2 and report.ahcq.j == 0.0


def test_prediction_folder_errors(shapes_roots: dict[str, Path], tmp_path: Path) -> None:
    samples = read_davis(shapes_roots["davis"])
    with pytest.raises(FileNotFoundError, match="missing predictions folder"):
        evaluate(samples, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="shapes"):
        evaluate(samples, tmp_path / "empty")
    sample = samples[0]
    preds = _perturb(sample)
    _write(tmp_path / "partial", sample, {f: m for f, m in preds.items() if f != 5}, "davis")
    with pytest.raises(FileNotFoundError, match="00005.png"):
        evaluate(samples, tmp_path / "partial")
    _write(tmp_path / "small", sample, {f: {o: m[:-1] for o, m in ms.items()} for f, ms in preds.items()},
           "davis")
    with pytest.raises(ValueError, match="does not match frame size"):
        evaluate(samples, tmp_path / "small")
    with pytest.raises(ValueError, match="shape"):
        evaluate(samples, {"shapes": {1: {1: np.zeros((3, 3), bool)}}})
