"""Video object segmentation J&F under two protocols, computed in one pass and reported side by side.

* official: the DAVIS 2017 / SA-V evaluator rule (as in vos-benchmark and Meta's sav_evaluator): J = IoU,
  F = boundary F of 1-px DAVIS boundary maps matched within a disk of radius ceil(0.008 * diagonal),
  first and last annotated frame of each object skipped, mean per object, then over objects.
* ahcq: the online metric of the AHCQ-SAM SAM2 benchmark, whose paper numbers use it: F compares thick
  boundary bands (dilation XOR erosion, round(0.02 * diagonal) iterations) with epsilon-smoothed P/R,
  and J and F are pooled over all (object, frame) pairs of the dataset.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ahcq.progress import progress_bar
from ahcq.video.datasets import Layout, VideoSample, read_label_png

OFFICIAL_BOUNDARY = 0.008
AHCQ_BAND = 0.02
AHCQ_EPS = 1e-6


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS seg2bmap rule: a pixel is boundary if it differs from its E, S or SE neighbour.

    On the last row only E is compared, on the last column only S, and the bottom-right pixel never
    counts; this matches the official tools pixel for pixel.
    """
    m = np.asarray(mask, bool)
    b = np.zeros_like(m)
    b[:, :-1] |= m[:, :-1] != m[:, 1:]
    b[:-1, :] |= m[:-1, :] != m[1:, :]
    b[:-1, :-1] |= m[:-1, :-1] != m[1:, 1:]
    return b


def official_radius(shape: tuple[int, ...]) -> int:
    """Boundary tolerance in pixels: ceil(0.008 * image diagonal), 8 at 854x480."""
    return math.ceil(OFFICIAL_BOUNDARY * math.hypot(shape[0], shape[1]))


def _matched(points: np.ndarray, targets: np.ndarray, radius: int) -> int:
    """How many `points` pixels lie within Euclidean `radius` of a `targets` pixel.

    Same as counting `points` inside a dilation of `targets` by skimage's disk(radius) (x^2 + y^2 <= r^2),
    but a nearest-neighbour query over the boundary pixels is far cheaper than dilating the whole frame.
    """
    dist, _ = cKDTree(np.argwhere(targets)).query(np.argwhere(points), distance_upper_bound=radius + 0.5)
    return int((np.rint(dist[np.isfinite(dist)] ** 2) <= radius * radius).sum())


def official_scores(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> tuple[float, float]:
    """(J, F) of one object on one frame, DAVIS rule.

    Void pixels (DAVIS label 255) are removed from both masks, as davis2017-evaluation does;
    vos-benchmark has no void handling, so the two agree whenever the GT carries no void label.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pb.sum()), int(gb.sum())
    if n_pred == 0 or n_gt == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
    else:
        radius = official_radius(gt.shape)
        precision = _matched(pb, gb, radius) / n_pred
        recall = _matched(gb, pb, radius) / n_gt
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return _iou(pred, gt), f


def ahcq_band(mask: np.ndarray) -> np.ndarray:
    """Thick boundary band of AHCQ-SAM: cross-structuring-element dilation XOR erosion, k iterations.

    k = max(1, round(0.02 * diagonal)). k iterations of the 3x3 cross equal one step of the L1 ball of
    radius k, so both are read off city-block distance transforms; outside the image counts as background.
    """
    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros_like(m)
    k = max(1, round(AHCQ_BAND * math.hypot(*m.shape)))
    dilated = ndimage.distance_transform_cdt(~m, metric="taxicab") <= k
    inside = ndimage.distance_transform_cdt(np.pad(m, 1), metric="taxicab")[1:-1, 1:-1]
    return dilated ^ (inside > k)


def ahcq_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(J, F) of one object on one frame under the AHCQ-SAM rule (epsilon on both sides of P and R)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    pb, gb = ahcq_band(pred), ahcq_band(gt)
    inter = np.logical_and(pb, gb).sum()
    precision = (inter + AHCQ_EPS) / (pb.sum() + AHCQ_EPS)
    recall = (inter + AHCQ_EPS) / (gb.sum() + AHCQ_EPS)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return _iou(pred, gt), float(f)


def official_frames(sample: VideoSample, obj: int) -> tuple[int, ...]:
    """Scored frames, official rule: annotated frames without the first and the last."""
    return sample.annotated_frames(obj)[1:-1]


def ahcq_frames(sample: VideoSample, obj: int) -> tuple[int, ...]:
    """Scored frames, AHCQ-SAM rule: first/last annotated frames dropped only if there are at least 3.

    AHCQ-SAM converts DAVIS to per-object PNGs written only where the object is visible, so for DAVIS its
    annotated frames are the frames where the object is present.
    """
    frames = sample.annotated_frames(obj)
    if sample.layout is Layout.DAVIS and sample.present_frames is not None:
        frames = sample.present_frames[obj]
    return frames[1:-1] if len(frames) >= 3 else frames


class Predictions(Protocol):
    """Predicted masks of a video frame; None means the model produced nothing (scored as empty)."""

    def masks(self, sample: VideoSample, frame: int, objects: Sequence[int]) -> dict[int, np.ndarray | None]:
        ...


@dataclass
class FolderPredictions:
    """Predictions saved like the GT: `<video>/<obj>/<frame>.png` (SA-V) or `<video>/<frame>.png` (DAVIS).

    A missing file is an error, as in the official tools: a half-written prediction folder must not
    silently score as empty masks.
    """

    root: Path
    _object_dirs: dict[str, dict[int, Path]] = field(default_factory=dict, repr=False)

    def masks(self, sample: VideoSample, frame: int, objects: Sequence[int]) -> dict[int, np.ndarray | None]:
        video_dir = Path(self.root) / sample.name
        if sample.name not in self._object_dirs:
            if not video_dir.is_dir():
                raise FileNotFoundError(f"missing prediction folder: {video_dir}")
            self._object_dirs[sample.name] = {
                int(p.name): p for p in video_dir.iterdir() if p.is_dir() and p.name.isdigit()}
        obj_dirs = self._object_dirs[sample.name]
        name = f"{sample.frame_names[frame]}.png"
        if not obj_dirs:
            labels = self._read(video_dir / name, sample)
            return {obj: labels == obj for obj in objects}
        out: dict[int, np.ndarray | None] = {}
        for obj in objects:
            if obj not in obj_dirs:
                raise FileNotFoundError(f"missing prediction folder for object {obj}: {video_dir}")
            out[obj] = self._read(obj_dirs[obj] / name, sample) > 0
        return out

    @staticmethod
    def _read(path: Path, sample: VideoSample) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"missing prediction: {path}")
        return read_label_png(path, sample.size)


@dataclass
class MemoryPredictions:
    """In-memory predictions `{video: {frame_index: {object: HxW mask}}}`, e.g. from the video predictor."""

    data: Mapping[str, Mapping[int, Mapping[int, np.ndarray]]]

    def masks(self, sample: VideoSample, frame: int, objects: Sequence[int]) -> dict[int, np.ndarray | None]:
        frame_masks = self.data.get(sample.name, {}).get(frame, {})
        out: dict[int, np.ndarray | None] = {}
        for obj in objects:
            mask = frame_masks.get(obj)
            if mask is not None and np.shape(mask) != sample.size:
                raise ValueError(f"prediction of video {sample.name!r} frame {frame} object {obj} has shape "
                                 f"{np.shape(mask)}, frames are {sample.size}")
            out[obj] = None if mask is None else np.asarray(mask, bool)
        return out


@dataclass(frozen=True)
class Score:
    """J and F in percent, with how many units (objects or (object, frame) pairs) they average."""

    j: float
    f: float
    count: int

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


@dataclass(frozen=True)
class VOSReport:
    """Both protocols on the same predictions; `per_object` holds the official (J, F) per (video, object)."""

    official: Score
    ahcq: Score
    per_object: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for tag, s in (("official", self.official), ("ahcq", self.ahcq)):
            out.update({f"{tag}/J&F": s.jf, f"{tag}/J": s.j, f"{tag}/F": s.f, f"{tag}/count": s.count})
        return out

    def table(self) -> str:
        rows = [f"{'protocol':<28}{'J&F':>7}{'J':>7}{'F':>7}  scored"]
        for label, s, unit in (("official (DAVIS / SA-V)", self.official, "objects"),
                               ("AHCQ-SAM (pooled, band F)", self.ahcq, "object-frames")):
            rows.append(f"{label:<28}{s.jf:>7.2f}{s.j:>7.2f}{s.f:>7.2f}  {s.count} {unit}")
        return "\n".join(rows)


def _as_source(predictions: Predictions | Path | str | Mapping) -> Predictions:
    if isinstance(predictions, (str, Path)):
        if not Path(predictions).is_dir():
            raise FileNotFoundError(f"missing predictions folder: {predictions}")
        return FolderPredictions(Path(predictions))
    if isinstance(predictions, Mapping):
        return MemoryPredictions(predictions)
    return predictions


def _score(values: list[tuple[float, float]]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, np.float64)
    return float(arr[:, 0].mean() * 100), float(arr[:, 1].mean() * 100)


def _official_object(records: list[tuple[float, float, bool, bool]]) -> tuple[float, float] | None:
    """Per-object mean. Like the official tools, an object enters scoring on the first frame where GT or
    prediction shows it, and an object never visible in the scored GT is left out."""
    start = next((i for i, r in enumerate(records) if not r[2]), len(records))
    kept = records[start:]
    if not any(r[3] for r in kept):
        return None
    return _score([(j, f) for j, f, _, _ in kept])


def _evaluate_video(sample: VideoSample, source: Predictions, pooled: list[tuple[float, float]],
                    per_object: dict[tuple[str, int], tuple[float, float]]) -> None:
    official = {obj: set(official_frames(sample, obj)) for obj in sample.objects}
    ahcq = {obj: set(ahcq_frames(sample, obj)) for obj in sample.objects}
    records: dict[int, list[tuple[float, float, bool, bool]]] = {obj: [] for obj in sample.objects}
    for frame in sorted(set().union(*official.values(), *ahcq.values())):
        objs = [o for o in sample.objects if frame in official[o] or frame in ahcq[o]]
        gts = sample.gt_masks(frame)
        preds = source.masks(sample, frame, objs)
        void = sample.void_mask(frame) if any(frame in official[o] for o in objs) else None
        for obj in objs:
            gt = gts[obj]
            pred = preds[obj] if preds[obj] is not None else np.zeros_like(gt)
            if frame in official[obj]:
                j, f = official_scores(pred, gt, void)
                records[obj].append((j, f, not gt.any() and not pred.any(), bool(gt.any())))
            if frame in ahcq[obj]:
                pooled.append(ahcq_scores(pred, gt))
    for obj, recs in records.items():
        score = _official_object(recs)
        if score is not None:
            per_object[(sample.name, obj)] = score


def evaluate(samples: Sequence[VideoSample], predictions: Predictions | Path | str | Mapping,
             progress: bool = False) -> VOSReport:
    """Score predictions (a folder in the GT layout, an in-memory mapping, or a `Predictions`) on samples."""
    source = _as_source(predictions)
    pooled: list[tuple[float, float]] = []
    per_object: dict[tuple[str, int], tuple[float, float]] = {}
    for sample in progress_bar(samples, desc="J&F", unit="video", disable=not progress, leave=False):
        _evaluate_video(sample, source, pooled, per_object)
    if not pooled and not per_object:
        raise ValueError("nothing to score: no object has an annotated frame left after skipping")
    per_obj = np.asarray(list(per_object.values()), np.float64).reshape(-1, 2)
    j, f = (per_obj.mean(axis=0).tolist() if per_object else (math.nan, math.nan))
    aj, af = _score(pooled)
    return VOSReport(Score(j, f, len(per_object)), Score(aj, af, len(pooled)), per_object)
