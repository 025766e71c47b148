"""Procedural video clips for the SAM2 testbed: textured shapes that move, grow or shrink, pass behind a
foreground pillar (partial occlusion, disappearance, re-appearance) among unannotated distractors of the
same class.

Each clip has one static pillar drawn over everything and, behind it, 1-3 annotated targets and 1-2
distractors (each a copy of a target's category and texture kind in other colours). One target, the
crosser, starts beside the pillar, smaller than its width, and moves across it, so it is fully hidden for
some frames and comes back; every object scales by a factor drawn away from 1 over the clip. Masks are the
visible pixels of each target. Every clip draws from its own generator seeded by (seed, split, index), so
the same arguments give identical clips.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ahcq.data.shapes import CATEGORIES, TEXTURES, _shape_mask, _smooth_noise, _texture

__all__ = ["Clip", "ClipObject", "ClipSpec", "bounce", "draw_clip"]


@dataclass(frozen=True)
class ClipSpec:
    """Knobs of one clip: frame count and size, the pillar's width as a fraction of the frame width, and a
    factor on the size of the objects that roam freely (the crosser is sized by the pillar)."""

    frames: int = 24
    height: int = 96
    width: int = 128
    max_targets: int = 3
    max_distractors: int = 2
    pillar_frac: float = 0.22
    noise_std: float = 3.0
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.frames < 4 or min(self.height, self.width) < 32:
            raise ValueError(f"ClipSpec: need at least 4 frames of 32x32 pixels, got {self.frames} frames of "
                             f"{self.height}x{self.width}")
        if self.max_targets < 1 or self.max_distractors < 0 or not 0.1 <= self.pillar_frac <= 0.4:
            raise ValueError("ClipSpec: max_targets >= 1, max_distractors >= 0 and pillar_frac in [0.1, 0.4]")
        if not 0.5 <= self.object_scale <= 2.5:
            raise ValueError(f"ClipSpec: object_scale must be in [0.5, 2.5], got {self.object_scale}")


@dataclass
class ClipObject:
    """One drawn object. ``target``: annotated; ``masks`` its visible pixels per frame, ``full_areas`` the
    pixels it would cover with nothing in front of it."""

    category: int
    texture: int
    target: bool
    masks: list[np.ndarray] = field(default_factory=list)
    full_areas: list[int] = field(default_factory=list)


@dataclass
class Clip:
    """Frames (uint8 HxWx3 each) and objects, targets first in annotation order."""

    frames: list[np.ndarray]
    objects: list[ClipObject]

    @property
    def targets(self) -> list[ClipObject]:
        return [o for o in self.objects if o.target]


@dataclass(frozen=True)
class _Motion:
    """Centre path (bouncing inside the frame), extent ``e0 * exp(growth * t / (T - 1))``, rotation."""

    cx: float
    cy: float
    vx: float
    vy: float
    extent: float
    growth: float
    rot: float
    spin: float
    look: int  # seeds the object's shape and colours, redrawn identically every frame


def bounce(start: float, step: float, t: int, low: float, high: float) -> float:
    """Position after ``t`` steps of constant velocity, reflected off ``[low, high]``."""
    span = max(high - low, 1e-6)
    pos = (start - low + step * t) % (2 * span)
    return low + (pos if pos <= span else 2 * span - pos)


def _growth(rng: np.random.Generator) -> float:
    """A log-scale change over the clip of 0.25 to 0.6 either way (area x1.6 to x3.3)."""
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.6))


def _render(category: int, texture: int, m: _Motion, t: int, spec: ClipSpec, yy: np.ndarray,
            xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's mask and RGB texture at frame ``t``."""
    frac = t / (spec.frames - 1)
    half = m.extent * float(np.exp(m.growth * frac)) / 2
    margin = half * 0.8
    cx = bounce(m.cx, m.vx, t, margin, spec.width - margin) if m.vx else m.cx
    cy = bounce(m.cy, m.vy, t, margin, spec.height - margin)
    rot = m.rot + m.spin * t
    dx, dy = (xx - cx) / half, (yy - cy) / half
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    look = np.random.default_rng(m.look)
    mask = _shape_mask(CATEGORIES[category], u, v, look)
    return mask, _texture(TEXTURES[texture], u, v, look)


def _crosser(rng: np.random.Generator, spec: ClipSpec, pillar: tuple[float, float]) -> _Motion:
    """Starts left of the pillar, fully visible, and passes behind it during the clip: its widest extent
    stays under the pillar's width, so for some frames nothing of it shows."""
    x0, x1 = pillar
    growth = _growth(rng)
    extent = (x1 - x0) * rng.uniform(0.45, 0.6) / max(1.0, float(np.exp(growth)))
    start = rng.uniform(extent, max(extent, x0 - extent * 0.8))
    travel = (x1 + extent * 1.5) - start  # fully out on the right by about 80 % of the clip
    return _Motion(start, rng.uniform(extent, spec.height - extent), travel / (0.8 * (spec.frames - 1)),
                   rng.uniform(-0.01, 0.01) * spec.height, extent, growth, rng.uniform(0, 2 * np.pi),
                   rng.uniform(-0.08, 0.08), int(rng.integers(2**31)))


def _wanderer(rng: np.random.Generator, spec: ClipSpec, pillar: tuple[float, float]) -> _Motion:
    """Bounces anywhere, starting clear of the pillar."""
    side_len = min(spec.height, spec.width)
    extent = min(side_len * rng.uniform(0.15, 0.3) * spec.object_scale, 0.45 * side_len)
    side = rng.random() < 0.5
    lo, hi = (extent, pillar[0] - extent * 0.6) if side else (pillar[1] + extent * 0.6, spec.width - extent)
    if hi <= lo:
        lo, hi = extent, spec.width - extent
    speed = rng.uniform(0.01, 0.03) * spec.width
    angle = rng.uniform(0, 2 * np.pi)
    return _Motion(rng.uniform(lo, hi), rng.uniform(extent, spec.height - extent), speed * np.cos(angle),
                   speed * np.sin(angle), extent, _growth(rng), rng.uniform(0, 2 * np.pi),
                   rng.uniform(-0.1, 0.1), int(rng.integers(2**31)))


def draw_clip(spec: ClipSpec, rng: np.random.Generator) -> Clip:
    """Render one clip. Objects are drawn back to front in a random order, the pillar last; a clip whose
    targets are not at least half visible on frame 0 (the prompt frame) is drawn again."""
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    while True:
        centre = w * rng.uniform(0.45, 0.6)
        pillar = (centre - spec.pillar_frac * w / 2, centre + spec.pillar_frac * w / 2)
        n_targets = int(rng.integers(1, spec.max_targets + 1))
        targets = [ClipObject(int(rng.integers(len(CATEGORIES))), int(rng.integers(len(TEXTURES))), True)
                   for _ in range(n_targets)]
        motions = [_crosser(rng, spec, pillar)] + [_wanderer(rng, spec, pillar) for _ in range(n_targets - 1)]
        distractors = []
        for _ in range(int(rng.integers(1, spec.max_distractors + 1)) if spec.max_distractors else 0):
            like = targets[int(rng.integers(n_targets))]
            distractors.append(ClipObject(like.category, like.texture, False))
            motions.append(_wanderer(rng, spec, pillar))
        objects = targets + distractors
        order = rng.permutation(len(objects))
        background = _smooth_noise(max(h, w), int(rng.integers(3, 7)), rng)[:h, :w]
        pillar_look = np.random.default_rng(int(rng.integers(2**31)))
        pillar_tex = _texture(TEXTURES[int(pillar_look.integers(len(TEXTURES)))], xx / w, yy / h, pillar_look)
        in_pillar = (xx >= pillar[0]) & (xx < pillar[1])
        frames = []
        for t in range(spec.frames):
            image, owner = background.copy(), np.full((h, w), -1)
            for k in order:
                mask, tex = _render(objects[k].category, objects[k].texture, motions[k], t, spec, yy, xx)
                image[mask], owner[mask] = tex[mask], k
                objects[k].full_areas.append(int(mask.sum()))
            image[in_pillar], owner[in_pillar] = pillar_tex[in_pillar], -1
            for k, obj in enumerate(objects):
                obj.masks.append(owner == k)
            image = image + rng.normal(0.0, spec.noise_std, image.shape)
            frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        if all(o.masks[0].sum() >= max(0.5 * o.full_areas[0], 16) for o in targets):
            return Clip(frames, objects)
