"""Analysis of a quantized SAM: what the plot tools (tools/plot_*.py) share.

``activations`` captures slot inputs and computes their statistics, ``figures`` draws them. This module
holds the run setup: a SAM from any checkpoint (official ViT-B/L/H or the tiny testbed with its json
sidecar), box-prompted samples from a COCO folder, one SAM forward per sample, the common CLI arguments
and the error handling, so every tool reads its inputs and fails the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import Sam

from ahcq.data.coco_io import load_coco_json, rle_to_mask
from ahcq.models.sam_checkpoint import load_sam
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_runner import decode_boxes, encode, prepare_image
from ahcq.models.tiny_sam import build_tiny_sam, sidecar_build_args
from ahcq.quantization.config import ConfigError, QConfig, load_qconfig

__all__ = [
    "Sample",
    "add_common_args",
    "encoder_block",
    "load_samples",
    "load_sam_checkpoint",
    "png_path",
    "run_cli",
    "sam_forward",
    "sam_masks",
    "setup_quantized",
    "setup_run",
]


@dataclass
class Sample:
    """One annotated image: HxWx3 uint8 RGB, xyxy boxes ``[N, 4]``, GT masks ``[N, H, W]`` and category ids
    ``[N]``."""

    image_id: int
    image: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    categories: np.ndarray


def load_sam_checkpoint(checkpoint: str | Path, model_type: str | None = None) -> Sam:
    """A float SAM in eval mode; a json sidecar with ``build_args`` marks a tiny-testbed checkpoint."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file {str(path)!r}")
    build_args = sidecar_build_args(path)
    if build_args is not None:
        return build_tiny_sam(checkpoint=path, **build_args)
    return load_sam(model_type, path).eval()


def load_samples(root: str | Path, split: str, count: int, seed: int) -> list[Sample]:
    """``count`` annotated images of ``root/split`` (seeded choice, sorted by id), without crowd boxes."""
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"--data: no annotation file {str(ann_file)!r}")
    data = load_coco_json(ann_file)
    anns: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            anns.setdefault(ann["image_id"], []).append(ann)
    infos = sorted((i for i in data["images"] if i["id"] in anns), key=lambda i: i["id"])
    if not 1 <= count <= len(infos):
        raise ValueError(f"asked for {count} {split} images; {ann_file.name} annotates {len(infos)}")
    pick = sorted(np.random.default_rng(seed).choice(len(infos), size=count, replace=False))
    samples = []
    for info in (infos[i] for i in pick):
        image_path = root / split / info["file_name"]
        if not image_path.is_file():
            raise FileNotFoundError(f"--data: image {str(image_path)!r} listed in {ann_file.name} is missing")
        with Image.open(image_path) as im:
            image = np.array(im.convert("RGB"))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in anns[info["id"]]]
        masks = np.stack([rle_to_mask(a["segmentation"]) for a in anns[info["id"]]])
        categories = np.array([a["category_id"] for a in anns[info["id"]]], dtype=np.int64)
        samples.append(Sample(info["id"], image, np.array(boxes, dtype=np.float32), masks, categories))
    return samples


def sam_masks(sam: Sam, sample: Sample, max_boxes: int) -> torch.Tensor:
    """Full-resolution masks ``[N, H, W]`` bool for the first ``max_boxes`` GT boxes (encoder + decoder)."""
    image = prepare_image(sam, sample.image)
    boxes = torch.from_numpy(sample.boxes[:max_boxes])
    return decode_boxes(sam, encode(sam, image), image, boxes)[0]


def sam_forward(sam: Sam, max_boxes: int) -> Callable[[Sample], None]:
    """A ``forward(sample)`` that runs ``sam`` on the sample (what capture and calibration need)."""

    def forward(sample: Sample) -> None:
        sam_masks(sam, sample, max_boxes)

    return forward


def add_common_args(parser: argparse.ArgumentParser, out_help: str, images: int) -> None:
    """The arguments every plot tool takes."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="SAM weights (official ViT-B/L/H, or tiny-testbed weights with a .json sidecar)")
    parser.add_argument("--model-type", default=None, choices=["vit_b", "vit_l", "vit_h"],
                        help="official variant (default: inferred from the weights)")
    parser.add_argument("--data", type=Path, default=Path("data/demo"),
                        help="COCO folder: annotations/instances_<split>.json and <split>/ images")
    parser.add_argument("--q_config", type=Path, default=Path("exp/config44.yaml"), help="quantization YAML")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--images", type=int, default=images, help="number of images (samples)")
    parser.add_argument("--max-boxes", type=int, default=8, help="GT box prompts per image")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the image choice and of calibration (default: the q_config's seed)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def setup_run(args: argparse.Namespace) -> tuple[QConfig, Sam]:
    """The q_config (its seed replaced by ``--seed`` when given) and the float SAM on ``--device``."""
    qconfig = load_qconfig(args.q_config)
    if args.seed is not None:
        qconfig = dataclasses.replace(qconfig, seed=args.seed)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    return qconfig, load_sam_checkpoint(args.checkpoint, args.model_type).to(args.device)


def setup_quantized(args: argparse.Namespace) -> tuple[QConfig, Sam, list[Sample]]:
    """``setup_run``'s q_config and SAM, the SAM quantized (encoder included, every quantizer OFF), and the
    ``--images`` samples of ``--split``."""
    qconfig, sam = setup_run(args)
    samples = load_samples(args.data, args.split, args.images, qconfig.seed)
    quantize_sam(sam, qconfig, quant_encoder=True)
    return qconfig, sam, samples


def encoder_block(depth: int, block: int | None) -> int:
    """``--encoder-block``, checked against the encoder's ``depth``; ``None`` picks the middle block."""
    block = depth // 2 if block is None else block
    if not 0 <= block < depth:
        raise ValueError(f"--encoder-block {block}: the encoder has blocks 0..{depth - 1}")
    return block


def png_path(out: Path, default_name: str) -> Path:
    """``out`` itself when it names a .png file, else ``default_name`` inside the folder ``out``."""
    return out if out.suffix.lower() == ".png" else out / default_name


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``main`` and turn bad input into a one-line error and exit status 2."""
    args = parser.parse_args(argv)
    if args.images < 1 or args.max_boxes < 1:
        parser.error("--images and --max-boxes must be >= 1")
    try:
        main(args)
    except (FileNotFoundError, ConfigError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
