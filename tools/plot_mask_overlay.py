"""FP versus quantized SAM masks on images, with GT boxes as prompts and per-box IoU against the GT masks.

The float masks come first; then the same SAM is quantized with ``quantize_sam`` and the given config,
calibrated on a few train images as in a PTQ run (BIG, statistics and ACNR where the config asks; no
reconstruction, so AdaRound weights are rounded to nearest) and run fully quantized. One row per image:
FP masks and quantized masks side by side, each box's mask in its own colour, the box prompts drawn.

    python tools/plot_mask_overlay.py --checkpoint ckpt/tiny_sam.pth --out plots/masks.png --images 3
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from segment_anything.modeling import Sam

from ahcq.analysis import (
    Sample,
    add_common_args,
    load_samples,
    png_path,
    run_cli,
    sam_forward,
    sam_masks,
    setup_run,
)
from ahcq.analysis.figures import MaskPanel, mask_overlay_figure, save_png
from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization.config import QConfig
from ahcq.solver.calibration import calibrate, switch_to_evaluation

__all__ = ["ImageResult", "main", "mask_iou"]


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-mask IoU of two ``[N, H, W]`` boolean stacks (1 where both masks are empty)."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass
class ImageResult:
    """One image's prompts, GT masks and the FP and quantized predictions."""

    sample: Sample
    boxes: np.ndarray
    gt: np.ndarray
    fp: np.ndarray
    quant: np.ndarray


def quantize_and_calibrate(sam: Sam, qconfig: QConfig, calib: Sequence[Sample], max_boxes: int) -> None:
    """``sam`` in place: quantized, calibrated on ``calib``, every quantizer on (the evaluation state)."""
    quantize_sam(sam, qconfig, quant_encoder=True)
    calibrate(sam, list(calib), sam_forward(sam, max_boxes), qconfig)
    switch_to_evaluation(sam)


def analyse(args: argparse.Namespace) -> tuple[list[ImageResult], str]:
    """FP and quantized masks for the sampled val images, and the quantized model's label (e.g. W4A4)."""
    qconfig, sam = setup_run(args)
    images = load_samples(args.data, args.split, args.images, qconfig.seed)
    calib = load_samples(args.data, "train", args.calib_images, qconfig.seed)
    fp = [sam_masks(sam, s, args.max_boxes).numpy() for s in images]
    quantize_and_calibrate(sam, qconfig, calib, args.max_boxes)
    results = [ImageResult(s, s.boxes[:args.max_boxes], s.masks[:args.max_boxes], f,
                           sam_masks(sam, s, args.max_boxes).numpy()) for s, f in zip(images, fp)]
    label = f"W{qconfig.w_qconfig.bit}A{qconfig.a_qconfig.bit}"
    return results, label


def _scores(iou: np.ndarray) -> list[str]:
    return [f"{v:.2f}" for v in iou]


def figure_rows(results: Sequence[ImageResult], label: str) -> list:
    """Rows for ``mask_overlay_figure``: FP and quantized panels titled with per-box IoU against GT."""
    rows = []
    for r in results:
        fp_iou, q_iou, agree = mask_iou(r.fp, r.gt), mask_iou(r.quant, r.gt), mask_iou(r.quant, r.fp)
        panels = [
            MaskPanel(f"image {r.sample.image_id}: FP, IoU vs GT per box", r.fp, _scores(fp_iou)),
            MaskPanel(f"{label}, IoU vs GT per box (vs FP: mean {agree.mean():.2f})", r.quant,
                      _scores(q_iou)),
        ]
        rows.append((r.sample.image, r.boxes, panels))
    return rows


def run(args: argparse.Namespace) -> None:
    results, label = analyse(args)
    path = save_png(mask_overlay_figure(figure_rows(results, label)), png_path(args.out, "mask_overlay.png"))
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_help="PNG path, or a folder for mask_overlay.png", images=3)
    p.set_defaults(max_boxes=4)
    p.add_argument("--split", default="val", help="COCO split of the images shown")
    p.add_argument("--calib-images", type=int, default=4, help="train images for the short calibration")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
