"""Post-GELU (encoder MLP lin2 input) and post-ReLU (decoder MLP lin2 input) histograms with HLUQ levels.

Each slot's HLUQ quantizer is calibrated as in a PTQ run (its output-aware grid search through lin2) on
the sampled images, while a uniform per-tensor quantizer with the config's activation observer and the same
bit width calibrates on exactly the same tensors. Top row: the histogram (log-y) with the HLUQ levels,
the log region and the uniform region in two colours and the breakpoint ``x_min + s1`` marked; bottom
row: the same histogram with the uniform levels. The levels are the quantizers' own decoded codes.

    python tools/plot_hluq_hist.py --checkpoint ckpt/tiny_sam.pth --out plots/hluq.png --images 4
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ahcq.analysis import add_common_args, encoder_block, png_path, run_cli, sam_forward, setup_quantized
from ahcq.analysis.activations import capture, code_levels, find_quantizers
from ahcq.analysis.figures import LevelPanel, LevelSet, level_figure, save_png
from ahcq.models.sam_quantize import DECODER_PATTERN
from ahcq.quantization.api import calibrating
from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import HLUQuantizer, Quantizer, Role, UniformQuantizer, make_quantizer

__all__ = ["hluq_levels", "main", "uniform_levels"]


def slot_names(depth: int, block: int | None, layer: int) -> dict[str, str]:
    """``{input-quantizer name: title}`` of the encoder and decoder lin2 inputs; ``block`` defaults to the
    middle encoder block."""
    encoder = f"image_encoder.blocks.{encoder_block(depth, block)}.mlp.lin2.input_quantizer"
    decoder = f"mask_decoder.transformer.layers.{layer}.mlp.lin2.input_quantizer"
    return {encoder: "encoder MLP lin2 input (post-GELU)", decoder: "decoder MLP lin2 input (post-ReLU)"}


def uniform_twin(name: str, hluq: Quantizer, qconfig: QConfig) -> UniformQuantizer:
    """The per-tensor uniform quantizer this slot would get without HLUQ (the config's observer)."""
    spec = qconfig.a_qconfig
    if qconfig.decoder_a_qconfig is not None and name.startswith(DECODER_PATTERN.rstrip("*")):
        spec = qconfig.decoder_a_qconfig
    return make_quantizer("fixed", Role.INPUT, hluq.bits, symmetric=False, ch_axis=None,
                          observer=spec.observer, name=f"{name} (uniform per tensor)")


def hluq_levels(q: HLUQuantizer) -> tuple[np.ndarray, np.ndarray, float]:
    """(log-region levels, uniform-region levels, breakpoint) decoded from every code of ``q``."""
    levels = code_levels(q)
    n_log = int(q.n_log)
    return levels[:n_log], levels[n_log:], float(q.x_min + q.s1.detach())


def uniform_levels(q: UniformQuantizer) -> np.ndarray:
    """Every level of a per-tensor uniform quantizer, decoded from its codes."""
    return q.dequantize_int(torch.arange(q.qmin, q.qmax + 1, dtype=torch.int32)).cpu().numpy()


Calibrated = dict[str, Quantizer]


def analyse(args: argparse.Namespace) -> tuple[list[list[LevelPanel]], Calibrated, Calibrated]:
    """The figure's panels, the calibrated HLUQ quantizers and their uniform twins (both by slot name)."""
    qconfig, sam, samples = setup_quantized(args)
    titles = slot_names(len(sam.image_encoder.blocks), args.encoder_block, args.decoder_layer)
    hluqs = find_quantizers(sam, titles, HLUQuantizer)
    twins = {name: uniform_twin(name, q, qconfig).to(sam.device) for name, q in hluqs.items()}
    with calibrating(nn.ModuleList([*hluqs.values(), *twins.values()])):
        acts = capture(sam, list(titles), samples, sam_forward(sam, args.max_boxes), twins=twins)
    top, bottom = [], []
    for name, q in hluqs.items():
        values = torch.cat(acts[name]).flatten().numpy()
        log_part, uni_part, breakpoint = hluq_levels(q)
        title = f"{titles[name]}, A{q.bits}"
        top.append(LevelPanel(f"{title}\nHLUQ", values, [
            LevelSet("hluq_log", "HLUQ log region", log_part, "tab:orange"),
            LevelSet("hluq_uniform", "HLUQ uniform region", uni_part, "tab:blue"),
            LevelSet("hluq_breakpoint", f"breakpoint x_min + s1 = {breakpoint:.3g}", np.array([breakpoint]),
                     "black", "--"),
        ]))
        bottom.append(LevelPanel(f"{title}\nuniform per tensor", values, [
            LevelSet("uniform", "uniform levels", uniform_levels(twins[name]), "tab:green"),
        ]))
    return [top, bottom], hluqs, twins


def run(args: argparse.Namespace) -> None:
    panels, _, _ = analyse(args)
    path = save_png(level_figure(panels), png_path(args.out, "hluq_hist.png"))
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_help="PNG path, or a folder for hluq_hist.png", images=4)
    p.add_argument("--split", default="train", help="COCO split the calibration images come from")
    p.add_argument("--encoder-block", type=int, default=None, help="encoder block (default: the middle one)")
    p.add_argument("--decoder-layer", type=int, default=0, help="two-way transformer layer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
