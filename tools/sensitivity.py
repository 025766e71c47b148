"""Per-site sensitivity of a quantized SAM: quantize one site at a time (everything else float), and remove
one site at a time from the fully quantized model; report the change in output error and mask AP.

    python tools/sensitivity.py --checkpoint ckpt/tiny_sam.pth --q_config exp/ahcqsam/w4a4.yaml \\
        --out runs/sensitivity --bits 4 6 8

For every width of ``--bits`` (default: the config's own activation width) the model is quantized at that
width (weights and activations), calibrated as the config asks (BIG, ACNR, weight groups; no
reconstruction) on ``--calib-images`` training images and measured on ``--images`` other training images
(``--split val``: validation images) with their ground-truth boxes as prompts (``ahcq.analysis.sensitivity``);
sites chosen from training images leave the evaluation set unseen. Writes ``results.json`` (every site's
MACs and, per width, ``alone_error``, ``alone_ap_drop``, ``removed_error``, ``removed_ap_gain``: the input of
the ``mixed`` config section), ``sensitivity.md`` and ``sensitivity.png``. Each width's measurement is kept
in ``bits<W>.json`` beside them and reused by a rerun with the same inputs, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ahcq.analysis import load_sam_checkpoint, load_samples, run_cli, sam_forward
from ahcq.analysis.figures import save_png
from ahcq.analysis.sensitivity import Evaluator, SiteGranularity, measure_sites, model_macs, quantizer_sites
from ahcq.data.coco_io import atomic_write_bytes
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_roles import big_sites
from ahcq.quantization.config import QConfig, load_qconfig
from ahcq.seeding import seed_everything
from ahcq.solver.calibration import BIG_IMAGES, calibrate, switch_to_evaluation
from ahcq.solver.results import write_json
from ahcq.solver.run_identity import code_version, digest, weights_digest

SENSITIVITY_FORMAT = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="SAM weights (official ViT-B/L/H, or tiny-testbed weights with a .json sidecar)")
    p.add_argument("--model-type", default=None, choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--data", type=Path, default=Path("data/demo"),
                   help="COCO folder: annotations/instances_{train,val}.json and the images")
    p.add_argument("--q_config", type=Path, default=Path("exp/ahcqsam/w4a4.yaml"), help="quantization YAML")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--bits", type=int, nargs="+", help="bit widths measured (default: the config's)")
    p.add_argument("--calib-images", type=int, default=8, help="training images for calibration")
    p.add_argument("--images", type=int, default=8, help="images measured")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="where the measured images come from: training images other than the calibration "
                        "ones (default: the evaluation set stays unseen by the sites chosen from them), or "
                        "validation images")
    p.add_argument("--max-boxes", type=int, default=8, help="ground-truth box prompts per image")
    p.add_argument("--granularity", type=SiteGranularity, choices=list(SiteGranularity),
                   default=SiteGranularity.LAYER, metavar="{layer,quantizer}",
                   help="a site: every quantizer of one module, or one quantizer")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the q_config's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def choose_images(data: Path, split: str, calib_images: int, images: int, seed: int) -> tuple[list, list]:
    """Calibration images (training) and measured images: from one seeded draw of training images, split,
    so none is calibrated on (``split="train"``), or validation images (``"val"``)."""
    if split == "train":
        drawn = load_samples(data, "train", calib_images + images, seed)
        return drawn[:calib_images], drawn[calib_images:]
    return load_samples(data, "train", calib_images, seed), load_samples(data, "val", images, seed)


def at_bits(qconfig: QConfig, bits: int) -> QConfig:
    """``qconfig`` with every recipe at ``bits`` and no reconstruction (sensitivity is measured after
    calibration)."""
    recipes = {f.name: getattr(qconfig, f.name) for f in dataclasses.fields(qconfig)
               if f.name.endswith("_qconfig") and getattr(qconfig, f.name) is not None}
    changed = {name: dataclasses.replace(r, bit=bits) for name, r in recipes.items()}
    return dataclasses.replace(qconfig, recon=dataclasses.replace(qconfig.recon, enabled=False), **changed)


def measure_width(args: argparse.Namespace, qconfig: QConfig, float_sam: torch.nn.Module, bits: int,
                  calib: list, evaluation: list, identity: dict[str, Any]) -> dict[str, Any]:
    """One width's site table (reused from ``bits<W>.json`` when its identity matches)."""
    path = args.out / f"bits{bits}.json"
    wanted = {**identity, "bits": bits}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") == wanted:
            print(f"bits {bits}: reusing {path}", file=sys.stderr)
            return saved
    seed_everything(qconfig.seed)
    sam = copy.deepcopy(float_sam)
    q = at_bits(qconfig, bits)
    quantize_sam(sam, q, quant_encoder=True)
    forward = sam_forward(sam, args.max_boxes)
    calibrate(sam, calib, forward, q, big_sites(sam), BIG_IMAGES)
    switch_to_evaluation(sam)
    sites = quantizer_sites(sam, args.granularity)
    model_macs(sam, sites, lambda: forward(evaluation[0]))
    table = measure_sites(sites, Evaluator(sam, evaluation, args.max_boxes))
    result = {"identity": wanted, **table}
    write_json(path, result)
    return result


def merge(widths: dict[int, dict[str, Any]], primary: int) -> dict[str, Any]:
    """``results.json``: per site its kind, MACs and quantizers, and per width its measurements."""
    first = widths[primary]
    sites = []
    for k, row in enumerate(first["sites"]):
        entry = {key: row[key] for key in ("site", "kind", "macs", "quantizers")}
        entry["by_bits"] = {}
        for bits, table in widths.items():
            other = table["sites"][k]
            if other["site"] != row["site"]:
                raise ValueError(f"the sites differ between widths: {other['site']!r} vs {row['site']!r}")
            entry["by_bits"][str(bits)] = {key: other[key] for key in other
                                          if key.startswith(("alone_", "removed_"))}
        sites.append(entry)
    return {"format": SENSITIVITY_FORMAT, "primary_bits": primary,
            "float": first["float"], "quantized": {str(b): t["quantized"] for b, t in widths.items()},
            "sites": sites}


def markdown(result: dict[str, Any]) -> str:
    primary = str(result["primary_bits"])
    lines = [f"# Per-site sensitivity (W{primary}A{primary})", "",
             f"Float mask AP {result['float']['mask_ap']:.2f}; fully quantized "
             f"{result['quantized'][primary]['mask_ap']:.2f} (output error "
             f"{result['quantized'][primary]['error']:.4g}).", "",
             "| site | kind | MACs/image | alone: error | alone: AP drop | removed: error "
             "| removed: AP gain |",
             "|:--|:--|--:|--:|--:|--:|--:|"]
    for s in result["sites"]:
        m = s["by_bits"][primary]
        lines.append(f"| {s['site']} | {s['kind']} | {s['macs']:.3g} | {m['alone_error']:.4g} | "
                     f"{m['alone_ap_drop']:.2f} | {m['removed_error']:.4g} | {m['removed_ap_gain']:.2f} |")
    return "\n".join(lines) + "\n"


def bar_plot(result: dict[str, Any]) -> Figure:
    primary = str(result["primary_bits"])
    names = [s["site"] for s in result["sites"]]
    drop = np.array([s["by_bits"][primary]["alone_ap_drop"] for s in result["sites"]])
    gain = np.array([s["by_bits"][primary]["removed_ap_gain"] for s in result["sites"]])
    fig = Figure(figsize=(max(8.0, 0.22 * len(names)), 5.0))
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, drop, 0.4, label="quantized alone: AP drop vs float")
    ax.bar(x + 0.2, gain, 0.4, label="removed from the quantized model: AP gain")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("mask AP (points)")
    ax.set_title(f"Per-site sensitivity, W{primary}A{primary}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> None:
    if args.calib_images < 1 or args.max_boxes < 1:
        raise ValueError("--calib-images and --max-boxes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    qconfig = load_qconfig(args.q_config)
    if args.seed is not None:
        qconfig = dataclasses.replace(qconfig, seed=args.seed)
    bits = args.bits or [qconfig.a_qconfig.bit]
    if any(not 2 <= b <= 8 for b in bits):
        raise ValueError(f"--bits {bits}: widths must be in 2..8")
    float_sam = load_sam_checkpoint(args.checkpoint, args.model_type)
    calib, evaluation = choose_images(args.data, args.split, args.calib_images, args.images, qconfig.seed)
    identity = {"qconfig": digest(dataclasses.asdict(qconfig)), "weights": weights_digest(float_sam),
                "data": str(args.data.resolve()), "calib_images": args.calib_images, "images": args.images,
                "split": args.split,
                "max_boxes": args.max_boxes, "granularity": args.granularity.value, "code": code_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    widths = {b: measure_width(args, qconfig, float_sam, b, calib, evaluation, identity) for b in bits}
    result = merge(widths, bits[0])
    result["q_config"] = str(args.q_config)
    write_json(args.out / "results.json", result)
    atomic_write_bytes(args.out / "sensitivity.md", markdown(result).encode())
    save_png(bar_plot(result), args.out / "sensitivity.png")
    print(f"wrote {args.out / 'results.json'}, sensitivity.md and sensitivity.png")


if __name__ == "__main__":
    sys.exit(run_cli(main, build_parser(), None))
