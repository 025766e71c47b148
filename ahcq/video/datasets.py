"""Readers and writers for the two VOS annotation layouts (SA-V per-object PNGs, DAVIS palette PNGs).

Both readers return the same `VideoSample`, so the propagation code and the J&F evaluator never care
which layout a dataset came from. Frames are ordered by the integer value of their file stem, which is
the order (and index) the SAM2 video predictor uses when it loads a JPEG folder.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

VOID_LABEL = 255
SAV_FRAMES, SAV_ANNOTATIONS = "JPEGImages_24fps", "Annotations_6fps"


class Layout(str, Enum):
    """Annotation layout: SA-V stores one binary PNG per object, DAVIS one palette PNG per frame."""

    SAV = "sav"
    DAVIS = "davis"


@dataclass(frozen=True)
class VideoSample:
    """One annotated video: ordered frames plus, per object, the annotation PNG of each annotated frame.

    Frame indices are positions in `frame_paths`. `annotations[obj][frame_index]` is the PNG holding that
    object's ground truth; `prompt_frames[obj]` is its first annotated frame with a non-empty mask, where
    the semi-supervised protocol gives the model the GT mask. `present_frames` lists, per object, the
    frames where its mask is non-empty when the reader already knows it (DAVIS), else None.
    """

    name: str
    layout: Layout
    frame_paths: tuple[Path, ...]
    size: tuple[int, int]
    annotations: Mapping[int, Mapping[int, Path]]
    prompt_frames: Mapping[int, int]
    present_frames: Mapping[int, tuple[int, ...]] | None = None

    @property
    def objects(self) -> tuple[int, ...]:
        return tuple(sorted(self.annotations))

    @property
    def frame_names(self) -> tuple[str, ...]:
        """File stems of the frames; annotation and prediction PNGs carry the same stems."""
        return tuple(p.stem for p in self.frame_paths)

    @property
    def frames_dir(self) -> Path:
        """The JPEG folder, as the SAM2 video predictor's `init_state` takes it."""
        return self.frame_paths[0].parent

    def annotated_frames(self, obj: int) -> tuple[int, ...]:
        return tuple(sorted(self.annotations[obj]))

    def prompt(self, obj: int) -> tuple[int, np.ndarray]:
        """(prompt frame index, GT mask there): what `add_new_mask` receives for this object."""
        frame = self.prompt_frames[obj]
        return frame, self.gt_mask(obj, frame)

    def gt_masks(self, frame: int) -> dict[int, np.ndarray]:
        """Boolean GT mask of every object annotated on `frame` (a DAVIS palette PNG is decoded once)."""
        decoded: dict[Path, np.ndarray] = {}
        out = {}
        for obj in self.objects:
            path = self.annotations[obj].get(frame)
            if path is None:
                continue
            if path not in decoded:
                decoded[path] = read_label_png(path, self.size)
            out[obj] = label_to_mask(decoded[path], obj, self.layout)
        return out

    def gt_mask(self, obj: int, frame: int) -> np.ndarray:
        path = self.annotations[obj].get(frame)
        if path is None:
            raise KeyError(f"object {obj} of video {self.name!r} has no annotation on frame {frame}")
        return label_to_mask(read_label_png(path, self.size), obj, self.layout)

    def void_mask(self, frame: int) -> np.ndarray | None:
        """DAVIS void pixels (label 255) on `frame`, excluded from scoring; None for SA-V or no void."""
        if self.layout is not Layout.DAVIS:
            return None
        path = next((a[frame] for a in self.annotations.values() if frame in a), None)
        if path is None:
            return None
        void = read_label_png(path, self.size) == VOID_LABEL
        return void if void.any() else None


def read_label_png(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Single-channel label image (binary or palette indices); rejects RGB images and wrong sizes."""
    with Image.open(path) as img:
        if img.mode not in ("1", "L", "P"):
            raise ValueError(f"{path}: expected a single-channel (binary, grey or palette) PNG, "
                             f"got mode {img.mode}")
        labels = np.array(img)
    if size is not None and labels.shape != tuple(size):
        raise ValueError(f"{path}: mask size {labels.shape} does not match frame size {tuple(size)}")
    return labels


def label_to_mask(labels: np.ndarray, obj: int, layout: Layout) -> np.ndarray:
    """Binary object mask: any non-zero pixel for SA-V, pixels equal to the object id for DAVIS."""
    return labels > 0 if Layout(layout) is Layout.SAV else labels == obj


def sorted_frames(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of `folder` with a given suffix, ordered by int(stem); non-integer or duplicate stems fail."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder: {folder}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()]
    keyed: dict[int, Path] = {}
    for p in files:
        try:
            key = int(p.stem)
        except ValueError:
            raise ValueError(f"{p}: frame name is not an integer") from None
        if key in keyed:
            raise ValueError(f"{folder}: frames {keyed[key].name} and {p.name} have the same number {key}")
        keyed[key] = p
    return [keyed[k] for k in sorted(keyed)]


def video_list(root: Path, split_file: Path | None, default_dir: Path) -> list[str]:
    """Video names from a split file (one per line), or every sub-folder of `default_dir`."""
    if split_file is not None:
        if not split_file.is_file():
            raise FileNotFoundError(f"missing split file: {split_file}")
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    else:
        if not default_dir.is_dir():
            raise FileNotFoundError(f"missing folder: {default_dir}")
        names = sorted(p.name for p in default_dir.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{split_file or default_dir}: no videos listed under {root}")
    return names


def _frames_of(frames_dir: Path) -> tuple[tuple[Path, ...], tuple[int, int], dict[int, int]]:
    frames = sorted_frames(frames_dir, (".jpg", ".jpeg"))
    if not frames:
        raise ValueError(f"{frames_dir}: no JPEG frames")
    with Image.open(frames[0]) as img:
        size = (img.height, img.width)
    return tuple(frames), size, {int(p.stem): i for i, p in enumerate(frames)}


def _frame_index(index_of: dict[int, int], png: Path) -> int:
    if int(png.stem) not in index_of:
        raise ValueError(f"{png}: annotation has no matching frame {png.stem}.jpg")
    return index_of[int(png.stem)]


def read_sav_video(root: Path, name: str) -> VideoSample:
    """One SA-V video: frames `JPEGImages_24fps/<name>/*.jpg`, masks `Annotations_6fps/<name>/<obj>/*.png`."""
    root = Path(root)
    frames, size, index_of = _frames_of(root / SAV_FRAMES / name)
    ann_dir = root / SAV_ANNOTATIONS / name
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"missing folder: {ann_dir}")
    annotations: dict[int, dict[int, Path]] = {}
    prompts: dict[int, int] = {}
    for obj_dir in sorted(p for p in ann_dir.iterdir() if p.is_dir()):
        try:
            obj = int(obj_dir.name)
        except ValueError:
            raise ValueError(f"{obj_dir}: object folder name is not an integer") from None
        pngs = sorted_frames(obj_dir, (".png",))
        if not pngs:
            raise ValueError(f"{obj_dir}: object folder holds no annotation PNGs")
        annotations[obj] = {_frame_index(index_of, p): p for p in pngs}
        prompts[obj] = next(
            (f for f, p in sorted(annotations[obj].items()) if read_label_png(p, size).any()), -1
        )
        if prompts[obj] < 0:
            raise ValueError(f"{obj_dir}: every annotation of this object is empty")
    if not annotations:
        raise ValueError(f"{ann_dir}: no object folders (no annotations)")
    return VideoSample(name, Layout.SAV, frames, size, annotations, prompts)


def read_davis_video(root: Path, name: str, resolution: str = "480p") -> VideoSample:
    """One DAVIS video: `JPEGImages/<res>/<name>/*.jpg`, `Annotations/<res>/<name>/*.png` (id = pixel value).

    A palette PNG annotates every object on its frame, so each object's annotated frames are all
    annotated frames of the video; its prompt frame is the first one where it is visible.
    """
    root = Path(root)
    frames, size, index_of = _frames_of(root / "JPEGImages" / resolution / name)
    pngs = sorted_frames(root / "Annotations" / resolution / name, (".png",))
    if not pngs:
        raise ValueError(f"{root / 'Annotations' / resolution / name}: no annotation PNGs")
    by_frame = {_frame_index(index_of, p): p for p in pngs}
    present: dict[int, list[int]] = {}
    for frame, png in by_frame.items():
        for obj in np.unique(read_label_png(png, size)).tolist():
            if obj not in (0, VOID_LABEL):
                present.setdefault(int(obj), []).append(frame)
    if not present:
        raise ValueError(f"{root / 'Annotations' / resolution / name}: no annotated objects")
    return VideoSample(
        name, Layout.DAVIS, frames, size,
        annotations={obj: by_frame for obj in sorted(present)},
        prompt_frames={obj: fr[0] for obj, fr in present.items()},
        present_frames={obj: tuple(fr) for obj, fr in present.items()},
    )


def read_sav(root: Path | str, split: str | None = None) -> list[VideoSample]:
    """SA-V style dataset; `split` names `<root>/<split>.txt`, else every annotated video is read."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"missing dataset folder: {root}")
    split_file = root / f"{split}.txt" if split else None
    return [read_sav_video(root, v) for v in video_list(root, split_file, root / SAV_ANNOTATIONS)]


def read_davis(root: Path | str, split: str | None = None, resolution: str = "480p",
               year: str = "2017") -> list[VideoSample]:
    """DAVIS style dataset; `split` names `ImageSets/<year>/<split>.txt`, else every annotated video."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"missing dataset folder: {root}")
    split_file = root / "ImageSets" / year / f"{split}.txt" if split else None
    names = video_list(root, split_file, root / "Annotations" / resolution)
    return [read_davis_video(root, v, resolution) for v in names]


def read_dataset(root: Path | str, layout: Layout | str, split: str | None = None) -> list[VideoSample]:
    """Dispatch on the layout name ("sav" or "davis")."""
    reader = read_sav if Layout(layout) is Layout.SAV else read_davis
    return reader(root, split)


def davis_palette() -> list[int]:
    """The 256-colour PASCAL/DAVIS palette (bits of the index spread over R, G and B)."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.extend(rgb)
    return palette


def write_masks(video_dir: Path, layout: Layout | str, frame_name: str, masks: Mapping[int, np.ndarray],
                size: tuple[int, int] | None = None) -> None:
    """Write one frame's object masks in a layout (GT or predictions; objects listed in id order).

    SA-V: `<video_dir>/<obj:03d>/<frame_name>.png`, 0/255. DAVIS: `<video_dir>/<frame_name>.png`, a palette
    PNG where later objects overwrite earlier ones where they overlap; `size` is needed if `masks` is empty.
    """
    video_dir = Path(video_dir)
    if Layout(layout) is Layout.SAV:
        for obj, mask in masks.items():
            (video_dir / f"{obj:03d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255, "L").save(
                video_dir / f"{obj:03d}" / f"{frame_name}.png")
        return
    shape = next(iter(masks.values())).shape if masks else size
    if shape is None:
        raise ValueError(f"{video_dir}: frame {frame_name} has no masks and no size to write an empty PNG")
    labels = np.zeros(shape, np.uint8)
    for obj, mask in masks.items():
        if not 0 < obj < VOID_LABEL:
            raise ValueError(f"{video_dir}: DAVIS object id {obj} is outside 1..254")
        labels[np.asarray(mask, bool)] = obj
    video_dir.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels, "P")
    img.putpalette(davis_palette())
    img.save(video_dir / f"{frame_name}.png")
