"""Generate the seeded demo instance-segmentation set (COCO format) used to train the small SAM.

    python tools/make_demo_data.py --out data/demo --seed 0 --num-train 2000 --num-val 200 --size 128

Writes {out}/{train,val}/NNNNNN.png and {out}/annotations/instances_{train,val}.json. Every image has
its own generator seeded by (seed, split, index), so the same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ahcq.data.coco_io import annotation, categories, write_coco_json
from ahcq.data.folders import replace_dir
from ahcq.data.shapes import CATEGORIES, SceneSpec, draw_scene

SPLITS = {"train": 0, "val": 1}


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generate_split(out: Path, split: str, num: int, seed: int, spec: SceneSpec) -> dict[str, Any]:
    """Draw ``num`` images of one split into out/split and return its COCO dict."""
    images, anns = [], []
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=out))
    try:
        for index in tqdm(range(num), desc=f"demo {split}", unit="img"):
            rng = np.random.default_rng([seed, SPLITS[split], index])
            img, objects = draw_scene(spec, rng)
            name = f"{index:06d}.png"
            (tmp / name).write_bytes(_png_bytes(img))
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "width": spec.size, "height": spec.size})
            for obj in objects:
                anns.append(annotation(len(anns) + 1, image_id, obj.category + 1, obj.mask))
        replace_dir(tmp, out / split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"description": "ahcq procedural shapes demo set", "seed": seed, "split": split}
    return {"info": info, "images": images, "annotations": anns, "categories": categories(CATEGORIES)}


def generate(out: Path, seed: int, num_train: int, num_val: int, size: int) -> dict[str, dict[str, Any]]:
    """Generate both splits and their annotation files; returns the COCO dicts by split."""
    spec = SceneSpec(size=size)
    result = {}
    for split, num in (("train", num_train), ("val", num_val)):
        result[split] = generate_split(out, split, num, seed, spec)
        write_coco_json(out / "annotations" / f"instances_{split}.json", result[split])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error("--size must be at least 32")
    if args.num_train < 1 or args.num_val < 1:
        parser.error("--num-train and --num-val must be positive")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    data = generate(args.out, args.seed, args.num_train, args.num_val, args.size)
    for split, d in data.items():
        n_img, n_ann = len(d["images"]), len(d["annotations"])
        print(f"{split}: {n_img} images, {n_ann} annotations -> {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
