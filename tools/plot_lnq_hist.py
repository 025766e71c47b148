"""Attention-probability histograms of SAM's mask decoder with the LNQ levels, and AGQ's for comparison.

Each chosen attention's LNQ quantizer (``lnq.enabled`` in the config) is calibrated as in a PTQ run (its
value-aware search over ``alpha`` and the clip) on the sampled images, while an AGQ quantizer with the
config's ``agq.taus`` and the same bit width calibrates on exactly the same probabilities and values.
Log-x, log-y histograms: top row with the LNQ levels, bottom row with the AGQ levels (both decoded from
every code; code 0 is the value 0, which a log axis cannot show).

    python tools/plot_lnq_hist.py --checkpoint ckpt/tiny_sam.pth --out plots/lnq.png --images 4
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn

from ahcq.analysis import add_common_args, png_path, run_cli, sam_forward, setup_quantized
from ahcq.analysis.activations import capture, code_levels, find_quantizers
from ahcq.analysis.figures import LevelPanel, LevelSet, level_figure, save_png
from ahcq.quantization.api import calibrating
from ahcq.quantization.quantizers import LNQuantizer, Quantizer, Role, make_quantizer

__all__ = ["main"]

ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


Calibrated = dict[str, Quantizer]


def analyse(args: argparse.Namespace) -> tuple[list[list[LevelPanel]], Calibrated, Calibrated]:
    """The figure's panels, the calibrated LNQ quantizers and their AGQ twins (both by slot name)."""
    qconfig, sam, samples = setup_quantized(args)
    layer = f"mask_decoder.transformer.layers.{args.decoder_layer}"
    names = [f"{layer}.{attention}.prob_quantizer" for attention in args.attention]
    lnqs = find_quantizers(sam, names, LNQuantizer)
    twins = {n: make_quantizer("agq", Role.ATTN_PROB, q.bits, taus=qconfig.agq.taus, name=f"{n} (agq)")
             .to(sam.device) for n, q in lnqs.items()}
    with calibrating(nn.ModuleList([*lnqs.values(), *twins.values()])):
        acts = capture(sam, names, samples, sam_forward(sam, args.max_boxes), twins=twins)
    top, bottom = [], []
    for name, q in lnqs.items():
        values = torch.cat(acts[name]).flatten().numpy()
        title = f"{name.removeprefix('mask_decoder.transformer.').removesuffix('.prob_quantizer')}, A{q.bits}"
        agq = twins[name]
        top.append(LevelPanel(f"{title}\nLNQ alpha={float(q.alpha):g}, clip={float(q.clip):.3g}", values, [
            LevelSet("lnq", "LNQ levels", code_levels(q), "tab:red"),
        ], log_x=True))
        bottom.append(LevelPanel(f"{title}\nAGQ tau={float(agq.tau):g}", values, [
            LevelSet("agq", "AGQ levels", code_levels(agq), "tab:purple"),
        ], log_x=True))
    return [top, bottom], lnqs, twins


def run(args: argparse.Namespace) -> None:
    panels, _, _ = analyse(args)
    path = save_png(level_figure(panels), png_path(args.out, "lnq_hist.png"))
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_help="PNG path, or a folder for lnq_hist.png", images=4)
    p.add_argument("--split", default="train", help="COCO split the calibration images come from")
    p.add_argument("--decoder-layer", type=int, default=0, help="two-way transformer layer")
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                   help="attentions of that layer (one column each)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
