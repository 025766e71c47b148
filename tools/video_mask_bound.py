"""How much J&F the SAM2 mask resolution leaves on a dataset: the ground truth itself, sent through the path
a predicted mask takes, scored as a prediction.

    python tools/video_mask_bound.py --root data/demo_videos/val --image-size 128 256

SAM2 predicts mask logits at a quarter of its input size (``image_size / 4`` square) and the video
predictor upsamples them to the frame bilinearly. Each ground-truth mask is taken to the model's input size
as sam2 takes a mask prompt (bilinear, antialiased, >= 0.5), scaled to logits as ``_use_mask_as_output``
does, down to the low-res grid, and back to the frame, thresholded at 0. Small objects lose most of their
pixels on a coarse grid, which bounds what any trained model of that input size can score there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ahcq.video import evaluate, read_dataset
from ahcq.video.datasets import VideoSample
from ahcq.video.propagation import FrameMasks


def through_low_res(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A boolean frame mask after the model's input size and its quarter-size logit grid."""
    m = torch.from_numpy(mask).float()[None, None]
    high = F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True) >= 0.5
    logits = high.float() * 20.0 - 10.0
    low = F.interpolate(logits, size=(image_size // 4, image_size // 4), mode="bilinear",
                        align_corners=False, antialias=True)
    back = F.interpolate(low, size=mask.shape, mode="bilinear", align_corners=False)
    return (back[0, 0] > 0).numpy()


def bound_predictions(sample: VideoSample, image_size: int) -> FrameMasks:
    """Every annotated frame's ground truth sent through the low-res grid, as predictions."""
    out: FrameMasks = {}
    for obj in sample.objects:
        for t in sample.annotations[obj]:
            out.setdefault(t, {})[obj] = through_low_res(sample.gt_mask(obj, t), image_size)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data/demo_videos/val"), help="SA-V-layout root")
    p.add_argument("--split", default="val")
    p.add_argument("--image-size", type=int, nargs="+", default=[128, 256])
    args = p.parse_args(argv)
    try:
        samples = read_dataset(args.root, "sav", args.split)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"{args.root}: {len(samples)} videos; the ground truth through SAM2's quarter-size mask grid\n")
    print("| image_size | low-res grid | official J&F | J | F | AHCQ-SAM J&F |")
    print("| --: | --: | --: | --: | --: | --: |")
    for size in args.image_size:
        report = evaluate(samples, {s.name: bound_predictions(s, size) for s in samples}).as_dict()
        print(f"| {size} | {size // 4} | {report['official/J&F']:.1f} | {report['official/J']:.1f} | "
              f"{report['official/F']:.1f} | {report['ahcq/J&F']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
