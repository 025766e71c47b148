"""Quantize SAM and evaluate it on COCO with box prompts (the references' ``test_quant.py``).

    python ahcq/solver/test_quant.py --config ./projects/configs/yolox/yolo_l-sam-vit-b.py \\
        --q_config ./exp/config44.yaml --quant-encoder

Without arguments it runs the demo: the tiny SAM prompted with ground-truth boxes on the generated
demo set (projects/configs/demo/tiny_sam_oracle.py) with exp/demo.yaml (the AHCQ-SAM W4A4 recipe on a CPU
budget) and a quantized encoder, the defaults that config names (``ahcq_defaults``).
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
from typing import Any

import torch

from ahcq.solver.cli import add_run_arguments, positive, quiet_third_party, run_cli

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = Path("projects/configs/demo/tiny_sam_oracle.py")


def _parser() -> argparse.ArgumentParser:
    from mmcv import DictAction

    from ahcq.solver.feature_cache import default_cache_dir

    p = argparse.ArgumentParser(
        prog="test_quant.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help=f"mmdet config (default: the demo, {DEMO_CONFIG})")
    p.add_argument("--q_config", type=Path,
                   help="quantization YAML (default: the config's ahcq_defaults, the demo's exp/demo.yaml; "
                        "else exp/config44.yaml)")
    p.add_argument("--quant-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the image encoder too (the mask decoder is always quantized; default: the "
                        "config's ahcq_defaults, on for the demo, else off)")
    add_run_arguments(p)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="feature cache (default: ${XDG_CACHE_HOME:-~/.cache}/ahcq/features)")
    p.add_argument("--calib-images", type=positive, help="calibration images (default: q_config calibrate)")
    p.add_argument("--calib-max-boxes", type=positive, default=32,
                   help="prompts per calibration image, best first, for calibration and reconstruction "
                        "(default: 32)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N images")
    p.add_argument("--pack", action="store_true",
                   help="also write the quantized model as one packed integer file, quantized.npz in --out "
                        "(python -m ahcq.deploy info|unpack reads it)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: also export the quantized model to ONNX (onnx/ in --out) and evaluate "
                        "it in ONNX Runtime beside the fake-quant model (uniform and CAG recipes)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fp-only", action="store_true", help="evaluate the float model only")
    mode.add_argument("--skip-fp", action="store_true", help="do not evaluate the float model")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override mmdet config keys, e.g. model.box_chunk=16")
    return p


def _options(args: argparse.Namespace) -> Any:
    from ahcq.solver.pipeline import RunOptions

    config = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else REPO / DEMO_CONFIG)
    return RunOptions(
        config=config, q_config=args.q_config, out=args.out, cache_dir=args.cache_dir,
        quant_encoder=args.quant_encoder, seed=args.seed, device=args.device,
        calib_images=args.calib_images, calib_max_boxes=args.calib_max_boxes, limit=args.limit,
        fp_only=args.fp_only, skip_fp=args.skip_fp, recon_iters=args.recon_iters, overwrite=args.overwrite,
        keep_state=args.keep_state, pack=args.pack, backend=args.backend,
        cfg_options=dict(args.cfg_options),
    )


def _start(args: argparse.Namespace) -> None:
    from ahcq.solver.pipeline import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; user errors exit non-zero with a one-line message naming the culprit."""
    quiet_third_party()
    return run_cli("test_quant.py", _parser().parse_args(argv), _start)


if __name__ == "__main__":
    sys.exit(main())
