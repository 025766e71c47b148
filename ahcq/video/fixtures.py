"""Small VOS clips on disk, in the SA-V or DAVIS layout, for tests and smoke runs of the video pipeline.

`make_moving_shapes_clip` draws a seeded clip of textured shapes that move, scale, rotate and occlude
one another; `labelme_clip_to_layout` turns a real labelme-annotated frame sequence (per-frame polygons)
into instance masks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ahcq.data.videos import bounce
from ahcq.video.datasets import SAV_ANNOTATIONS, SAV_FRAMES, Layout, sorted_frames, write_masks

LABELME_CLIP_DIR = Path("/usr/share/doc/labelme-examples/examples/video_annotation/data_annotated")
_KINDS = ("ellipse", "rectangle", "triangle")


def layout_dirs(root: Path, layout: Layout | str, video: str) -> tuple[Path, Path]:
    """(frames folder, annotation folder) of `video` under a dataset root."""
    root = Path(root)
    if Layout(layout) is Layout.SAV:
        return root / SAV_FRAMES / video, root / SAV_ANNOTATIONS / video
    return root / "JPEGImages" / "480p" / video, root / "Annotations" / "480p" / video


def _add_to_split(root: Path, layout: Layout | str, split: str, video: str) -> None:
    is_sav = Layout(layout) is Layout.SAV
    split_file = Path(root) / (f"{split}.txt" if is_sav else f"ImageSets/2017/{split}.txt")
    split_file.parent.mkdir(parents=True, exist_ok=True)
    names = split_file.read_text().split() if split_file.exists() else []
    if video not in names:
        split_file.write_text("".join(f"{n}\n" for n in [*names, video]))


def _object_id(index: int, layout: Layout | str) -> int:
    """SA-V object folders count from 000; DAVIS ids start at 1 because 0 is background."""
    return index if Layout(layout) is Layout.SAV else index + 1


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                aspect: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    if kind == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2 + k * 2 * np.pi / 3 for k in range(3))]
    return np.all([u * nx + v * ny <= r / 2 for nx, ny in normals], axis=0)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    coarse = rng.integers(40, 200, size=(6, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(smooth, np.float64)


def make_moving_shapes_clip(root: Path | str, layout: Layout | str, n_frames: int = 8,
                            size: tuple[int, int] = (96, 128), n_objects: int = 2, seed: int = 0,
                            video: str = "shapes", annotate_every: int = 1, split: str = "val") -> str:
    """Write a deterministic clip of moving, scaling, occluding textured shapes with its GT masks.

    GT masks are the visible (occlusion-resolved) pixels, so the SA-V and DAVIS versions of the same clip
    hold identical masks. Every object starts unoccluded on frame 0; GT is written on every
    `annotate_every`-th frame (SA-V annotates 6 fps of 24 fps, i.e. 4). Returns the video name.
    """
    if n_frames < 1 or n_objects < 1 or annotate_every < 1:
        raise ValueError("n_frames, n_objects and annotate_every must be positive")
    if Layout(layout) is Layout.DAVIS and n_objects > 254:
        raise ValueError(f"n_objects={n_objects}: a DAVIS palette holds at most 254 objects")
    rng = np.random.default_rng(seed)
    h, w = size
    grid = int(np.ceil(np.sqrt(n_objects)))
    cell = min(h, w) / grid
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    background = _background(rng, size)
    objects = []
    for k in range(n_objects):
        row, col = divmod(k, grid)
        objects.append(dict(
            kind=_KINDS[k % len(_KINDS)], cy=(row + 0.5) * h / grid, cx=(col + 0.5) * w / grid,
            r=rng.uniform(0.25, 0.35) * cell, aspect=rng.uniform(0.6, 1.0), angle=rng.uniform(0, np.pi),
            spin=rng.uniform(-0.2, 0.2), vy=rng.uniform(-0.04, 0.04) * h, vx=rng.uniform(-0.04, 0.04) * w,
            phase=rng.uniform(0, 2 * np.pi), color=rng.uniform(40, 215, 3), freq=rng.uniform(0.3, 0.8),
        ))
    frames_dir, ann_dir = layout_dirs(root, layout, video)
    frames_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n_frames):
        image, shapes = background.copy(), []
        for o in objects:
            r = o["r"] * (1 + 0.25 * np.sin(o["phase"] + 2 * np.pi * t / max(n_frames, 2)))
            cy = bounce(o["cy"], o["vy"], t, r, h - r)
            cx = bounce(o["cx"], o["vx"], t, r, w - r)
            mask = _shape_mask(o["kind"], yy, xx, cy, cx, r, o["aspect"], o["angle"] + o["spin"] * t)
            stripes = 35 * np.sin(o["freq"] * (xx + yy))[..., None]
            image[mask] = np.clip(o["color"] + stripes, 0, 255)[mask]
            shapes.append(mask)
        visible = [m & ~np.any(shapes[k + 1:], axis=0) if k + 1 < len(shapes) else m
                   for k, m in enumerate(shapes)]
        name = f"{t:05d}"
        Image.fromarray(image.astype(np.uint8)).save(frames_dir / f"{name}.jpg", quality=95)
        if t % annotate_every == 0:
            masks = {_object_id(k, layout): m for k, m in enumerate(visible)}
            write_masks(ann_dir, layout, name, masks)
    _add_to_split(root, layout, split, video)
    return video


Polygon = list[tuple[float, float]]


def _labelme_instances(json_path: Path) -> tuple[tuple[int, int], list[tuple[str, Polygon]]]:
    """Image size and the (label, polygon) list of one labelme json, in file order."""
    data = json.loads(Path(json_path).read_text())
    shapes = []
    for i, shape in enumerate(data.get("shapes", [])):
        if shape.get("shape_type", "polygon") != "polygon":
            raise ValueError(f"{json_path}: shape {i} ({shape.get('label')!r}) is a "
                             f"{shape.get('shape_type')!r}, only polygons are supported")
        points = [(float(x), float(y)) for x, y in shape["points"]]
        if len(points) < 3:
            raise ValueError(f"{json_path}: polygon {i} ({shape['label']!r}) has fewer than 3 points")
        shapes.append((shape["label"], points))
    return (int(data["imageHeight"]), int(data["imageWidth"])), shapes


def labelme_clip_to_layout(src_dir: Path | str, root: Path | str, layout: Layout | str,
                           video: str = "labelme_street", split: str = "val") -> str:
    """Rasterise a labelme frame sequence (`<n>.jpg` + `<n>.json` with polygons) into a VOS layout.

    The k-th polygon with a given label in a frame is instance k of that label; instances are numbered
    in order of first appearance. Frames keep their number (written as 5 digits); the JPEGs are copied
    byte for byte. In DAVIS, later instances cover earlier ones where polygons overlap. Returns the video.
    """
    src_dir = Path(src_dir)
    jsons = sorted_frames(src_dir, (".json",))
    if not jsons:
        raise ValueError(f"{src_dir}: no labelme json files")
    parsed = [(json_path, *_labelme_instances(json_path)) for json_path in jsons]
    for json_path, size, _ in parsed:
        jpg = json_path.with_suffix(".jpg")
        if not jpg.is_file():
            raise FileNotFoundError(f"{json_path}: missing image {jpg.name}")
        with Image.open(jpg) as img:
            if (img.height, img.width) != size:
                raise ValueError(f"{json_path}: annotated size {size} differs from {jpg.name} "
                                 f"({img.height}, {img.width})")
    frames_dir, ann_dir = layout_dirs(root, layout, video)
    frames_dir.mkdir(parents=True, exist_ok=True)
    instance_ids: dict[tuple[str, int], int] = {}
    for json_path, size, shapes in parsed:
        masks, seen = {}, {}
        for label, points in shapes:
            key = (label, seen.setdefault(label, 0))
            seen[label] += 1
            obj = instance_ids.setdefault(key, _object_id(len(instance_ids), layout))
            canvas = Image.new("L", (size[1], size[0]), 0)
            ImageDraw.Draw(canvas).polygon(points, fill=1)
            masks[obj] = np.asarray(canvas, bool)
        name = f"{int(json_path.stem):05d}"
        shutil.copyfile(json_path.with_suffix(".jpg"), frames_dir / f"{name}.jpg")
        write_masks(ann_dir, layout, name, dict(sorted(masks.items())), size)
    _add_to_split(root, layout, split, video)
    return video
