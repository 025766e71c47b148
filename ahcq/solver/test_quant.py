"""Quantize SAM and evaluate it on COCO with box prompts (the references' ``test_quant.py``).

    python ahcq/solver/test_quant.py --config ./projects/configs/yolox/yolo_l-sam-vit-b.py \\
        --q_config ./exp/config44.yaml --quant-encoder

Without arguments it runs the demo: the tiny SAM prompted with ground-truth boxes on the generated
demo set (projects/configs/demo/tiny_sam_oracle.py) with exp/demo.yaml (the AHCQ-SAM W4A4 recipe on a CPU
budget) and a quantized encoder.
The demo needs its data and weights; a missing one is named with the command that makes it
(python tools/make_demo_data.py, python tools/train_tiny_sam.py).

Writes ``results.json`` (float and quantized segm/bbox AP x 100, resolved configs, seed, timings) and
the per-detection COCO result files to ``--out`` and prints a float-vs-quantized table. Detector boxes
and SAM encoder inputs are cached under ``--cache-dir``; a second run reuses them ("cache hit").
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from mmcv import DictAction

from ahcq.solver.cli import positive, run_cli
from ahcq.solver.pipeline import RunOptions, UserError, run

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = Path("projects/configs/demo/tiny_sam_oracle.py")
DEMO_QCONFIG = Path("exp/demo.yaml")
DEFAULT_QCONFIG = Path("exp/config44.yaml")


def _in_repo(path: Path) -> Path:
    """A default file, relative to the working directory when run from the repository root."""
    return path if path.is_file() else REPO / path


def _parser() -> argparse.ArgumentParser:
    from ahcq.solver.feature_cache import default_cache_dir

    p = argparse.ArgumentParser(
        prog="test_quant.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help=f"mmdet config (default: the demo, {DEMO_CONFIG})")
    p.add_argument("--q_config", type=Path,
                   help=f"quantization YAML (default: {DEFAULT_QCONFIG}; for the demo {DEMO_QCONFIG})")
    p.add_argument("--quant-encoder", action="store_true",
                   help="quantize the image encoder too (the mask decoder is always quantized; "
                        "on by default when no --config is given)")
    p.add_argument("--out", type=Path, help="results folder (default: runs/<config>__<q_config>)")
    p.add_argument("--seed", type=int, help="seed of the run (default: the q_config's seed)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive,
                   help="CPU threads for torch (default: torch's; 1 avoids oversubscribing shared machines)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="feature cache (default: ${XDG_CACHE_HOME:-~/.cache}/ahcq/features)")
    p.add_argument("--calib-images", type=positive, help="calibration images (default: q_config calibrate)")
    p.add_argument("--calib-max-boxes", type=positive, default=32,
                   help="prompts per calibration image, best first (default: 32)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N images")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fp-only", action="store_true", help="evaluate the float model only")
    mode.add_argument("--skip-fp", action="store_true", help="do not evaluate the float model")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override mmdet config keys, e.g. model.box_chunk=16")
    return p


def _options(args: argparse.Namespace) -> RunOptions:
    demo = args.config is None
    config = args.config or _in_repo(DEMO_CONFIG)
    q_config = args.q_config or _in_repo(DEMO_QCONFIG if demo else DEFAULT_QCONFIG)
    out = args.out or Path("runs") / f"{config.stem}__{q_config.stem}"
    return RunOptions(
        config=config, q_config=q_config, out=out, cache_dir=args.cache_dir,
        quant_encoder=args.quant_encoder or demo, seed=args.seed, device=args.device,
        calib_images=args.calib_images, calib_max_boxes=args.calib_max_boxes, limit=args.limit,
        fp_only=args.fp_only, skip_fp=args.skip_fp, cfg_options=dict(args.cfg_options),
    )


def _start(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; user errors exit non-zero with a one-line message naming the culprit."""
    return run_cli("test_quant.py", _parser().parse_args(argv), _start, UserError)


if __name__ == "__main__":
    sys.exit(main())
