"""Procedural drawing of textured, occluding shapes for the demo instance-segmentation set.

Everything is drawn with numpy on pixel centres, so the stored masks are exactly the pixels that
carry an object's colour, and a seeded generator reproduces an image bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES: tuple[str, ...] = (
    "ellipse", "rectangle", "triangle", "star", "ring", "cross", "crescent", "blob",
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "gradient")


@dataclass(frozen=True)
class SceneSpec:
    """Knobs of one scene; the defaults give 1-8 annotated objects from tiny to near image size."""

    size: int = 128
    max_objects: int = 8
    min_extent: float = 8.0
    max_extent_frac: float = 0.85
    min_visible_frac: float = 0.4
    min_area: int = 16
    clutter: int = 12
    noise_std: float = 4.0


@dataclass
class SceneObject:
    """A visible object: category index into CATEGORIES and its visible binary mask."""

    category: int
    mask: np.ndarray


def _polygon_inside(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the query points."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        crosses = (y1 > v) != (y0 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _shape_mask(cat: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inside test of a shape in normalised coordinates (its extent is roughly [-1, 1]^2)."""
    if cat == "ellipse":
        return u**2 + (v / rng.uniform(0.4, 1.0)) ** 2 <= 1.0
    if cat == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= rng.uniform(0.3, 1.0))
    if cat == "triangle":
        ang = np.array([0.0, 2.0944, 4.1888]) + rng.uniform(-0.35, 0.35, 3)
        return _polygon_inside(u, v, np.stack([np.cos(ang), np.sin(ang)], 1))
    if cat == "star":
        n = int(rng.integers(5, 8))
        ang = np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        return _polygon_inside(u, v, np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1))
    if cat == "ring":
        r2 = u**2 + (v / rng.uniform(0.7, 1.0)) ** 2
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.45, 0.7) ** 2)
    if cat == "cross":
        w = rng.uniform(0.22, 0.36)
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= 1.0)) | ((av <= w) & (au <= 1.0))
    if cat == "crescent":
        d, r = rng.uniform(0.35, 0.6), rng.uniform(0.75, 0.95)
        return (u**2 + v**2 <= 1.0) & ((u - d) ** 2 + v**2 > r**2)
    if cat == "blob":
        phi = np.arctan2(v, u)
        k = np.arange(2, 5)[:, None, None]
        amp, phase = rng.uniform(0.05, 0.2, 3), rng.uniform(0, 2 * np.pi, 3)
        rad = 0.7 + np.sum(amp[:, None, None] * np.cos(k * phi + phase[:, None, None]), 0)
        return u**2 + v**2 <= (rad / (0.7 + amp.sum())) ** 2
    raise ValueError(f"unknown shape category {cat!r}")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB float texture (h, w, 3) in the object's own frame, so it scales with the object."""
    c1, c2 = _random_color(rng), _random_color(rng)
    if name == "solid":
        t = np.zeros_like(u)
    elif name == "stripes":
        a = rng.uniform(0, np.pi)
        t = (np.sin(np.pi * rng.uniform(2, 5) * (u * np.cos(a) + v * np.sin(a))) > 0).astype(float)
    elif name == "checker":
        k = rng.uniform(1.5, 4)
        t = ((np.floor(u * k) + np.floor(v * k)) % 2).astype(float)
    elif name == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + 0.5 * (u * np.cos(a) + v * np.sin(a)), 0, 1)
    else:
        raise ValueError(f"unknown texture {name!r}")
    return c1 + t[..., None] * (c2 - c1)


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency colour field: a coarse grid around one base colour, bilinearly upsampled."""
    grid = rng.uniform(40, 215, 3) + rng.uniform(-60, 60, (cells, cells, 3))
    pos = np.linspace(0, cells - 1, size)
    i0 = np.minimum(np.floor(pos).astype(int), cells - 2)
    f = (pos - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]
    f = f[None, :, :]
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def _background(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour field plus unannotated clutter (strokes and specks) that prompts must ignore."""
    s = spec.size
    img = _smooth_noise(s, int(rng.integers(3, 7)), rng)
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    for _ in range(int(rng.integers(0, spec.clutter + 1))):
        color = _random_color(rng)
        if rng.random() < 0.5:
            p, q = rng.uniform(0, s, 2), rng.uniform(0, s, 2)
            d = q - p
            t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
            dist2 = (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2
            sel = dist2 <= rng.uniform(0.3, 1.5) ** 2
        else:
            c, r = rng.uniform(0, s, 2), rng.uniform(0.8, 2.5)
            sel = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= r**2
        img[sel] = color
    return img


def _place_object(
    spec: SceneSpec, rng: np.random.Generator
) -> tuple[int, tuple[slice, slice], np.ndarray, np.ndarray]:
    """Draw one object: category, window slices, its mask in the window and its RGB texture."""
    s = spec.size
    cat = int(rng.integers(len(CATEGORIES)))
    extent = float(np.exp(rng.uniform(np.log(spec.min_extent), np.log(spec.max_extent_frac * s))))
    half = extent / 2
    cx, cy = rng.uniform(0, s, 2)
    rot = rng.uniform(0, 2 * np.pi)
    x0, x1 = max(int(cx - half * 1.5), 0), min(int(np.ceil(cx + half * 1.5)) + 1, s)
    y0, y1 = max(int(cy - half * 1.5), 0), min(int(np.ceil(cy + half * 1.5)) + 1, s)
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = (xx - cx) / half, (yy - cy) / half
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    mask = _shape_mask(CATEGORIES[cat], u, v, rng)
    tex = _texture(TEXTURES[int(rng.integers(len(TEXTURES)))], u, v, rng)
    return cat, (slice(y0, y1), slice(x0, x1)), mask, tex


def draw_scene(spec: SceneSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[SceneObject]]:
    """Render one image (uint8 HxWx3) and its visible, sufficiently unoccluded objects.

    Later objects cover earlier ones; an object keeps only its visible pixels and is dropped when
    fewer than ``min_visible_frac`` of its drawn pixels (or ``min_area`` pixels) remain visible.
    Scenes without any kept object are redrawn, so every image has 1..max_objects annotations.
    """
    s = spec.size
    while True:
        img = _background(spec, rng)
        owner = np.full((s, s), -1, dtype=np.int32)
        drawn: list[tuple[int, int, int]] = []
        for idx in range(int(rng.integers(1, spec.max_objects + 1))):
            cat, win, mask, tex = _place_object(spec, rng)
            if mask.sum() < spec.min_area:
                continue
            img[win][mask] = tex[mask]
            owner[win][mask] = idx
            drawn.append((idx, cat, int(mask.sum())))
        objects = []
        for idx, cat, full_area in drawn:
            visible = owner == idx
            area = int(visible.sum())
            if area >= spec.min_area and area >= spec.min_visible_frac * full_area:
                objects.append(SceneObject(category=cat, mask=visible))
        if objects:
            img = img + rng.normal(0.0, spec.noise_std, img.shape)
            return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects
