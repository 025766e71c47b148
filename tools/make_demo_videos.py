"""Generate the seeded demo video set (SA-V layout) for the SAM2 testbed.

    python tools/make_demo_videos.py --out data/demo_videos --seed 0 --num-train 48 --num-val 12

Writes one SA-V root per split, ``{out}/{train,val}/``: JPEG frames ``JPEGImages_24fps/<video>/NNNNN.jpg``,
one 0/255 PNG per target and frame ``Annotations_6fps/<video>/<obj:03d>/NNNNN.png`` (every frame is
annotated; empty where the target is hidden), and the split's video list ``<split>.txt``. Clips are drawn
by ``ahcq.data.videos``: moving, scaling textured shapes that pass behind a foreground pillar, among
unannotated distractors of the same class. Every clip has its own generator seeded by (seed, split, index),
so the same arguments give identical files; a split is swapped into place only once it is complete.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ahcq.data.folders import replace_dir
from ahcq.data.videos import ClipSpec, draw_clip
from ahcq.video.datasets import SAV_ANNOTATIONS, SAV_FRAMES, write_masks

SPLITS = {"train": 0, "val": 1}


def generate_split(out: Path, split: str, num: int, seed: int, spec: ClipSpec) -> list[str]:
    """Draw ``num`` clips of one split into ``out/split``; returns the video names."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=out))
    names = []
    try:
        for index in tqdm(range(num), desc=f"videos {split}", unit="clip"):
            clip = draw_clip(spec, np.random.default_rng([seed, SPLITS[split], index]))
            video = f"{split}_{index:04d}"
            frames_dir = tmp / SAV_FRAMES / video
            frames_dir.mkdir(parents=True)
            for t, frame in enumerate(clip.frames):
                Image.fromarray(frame).save(frames_dir / f"{t:05d}.jpg", quality=95)
                masks = {k: obj.masks[t] for k, obj in enumerate(clip.targets)}
                write_masks(tmp / SAV_ANNOTATIONS / video, "sav", f"{t:05d}", masks)
            names.append(video)
        (tmp / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        replace_dir(tmp, out / split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo_videos"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-val", type=int, default=12)
    parser.add_argument("--frames", type=int, default=24, help="frames per clip")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                        help="frame height and width in pixels")
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="size factor of the freely moving objects (0.5-2.5)")
    parser.add_argument("--pillar-frac", type=float, default=0.22,
                        help="occluding pillar's width as a fraction of the frame width (0.1-0.4)")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error("--num-train and --num-val must be positive")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    try:
        spec = ClipSpec(frames=args.frames, height=args.size[0], width=args.size[1],
                        object_scale=args.object_scale, pillar_frac=args.pillar_frac)
    except ValueError as err:
        parser.error(str(err))
    for split, num in (("train", args.num_train), ("val", args.num_val)):
        names = generate_split(args.out, split, num, args.seed, spec)
        print(f"{split}: {len(names)} clips of {spec.frames} frames -> {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
