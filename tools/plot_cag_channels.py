"""Inter-channel variation and inter-sample stability at SAM's CAG layers, one PNG per layer.

Per layer: (a) the distribution of each channel's float activations over the sampled images (whiskers at
the channel's min and max), for a window of channels (default 50-100, or every channel of a narrower
layer); (b) for each channel, the cosine similarity between every pair of images of that image's own
optimal (scale, zero point), as found by the project's MSE observer at the slot's bit width. High
similarity is what justifies fixing channel groups once, offline (CAG).

    python tools/plot_cag_channels.py --checkpoint ckpt/tiny_sam.pth --out plots/cag --images 8
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ahcq.analysis import add_common_args, encoder_block, run_cli, sam_forward, setup_quantized
from ahcq.analysis.activations import (
    capture,
    channel_ranges,
    find_quantizers,
    pairwise_param_cosine,
    per_sample_qparams,
)
from ahcq.analysis.figures import cag_channel_figure, save_png
from ahcq.quantization.observers import OBSERVERS
from ahcq.quantization.quantizers import CAGQuantizer

ENC = "image_encoder.blocks.{block}"
DEC = "mask_decoder.transformer.layers.{layer}"
CAG_LAYERS: tuple[tuple[str, str], ...] = (
    ("encoder QKV projection input", f"{ENC}.attn.qkv"),
    ("encoder MLP lin1 input", f"{ENC}.mlp.lin1"),
    ("decoder token-to-image q_proj input", f"{DEC}.cross_attn_token_to_image.q_proj"),
    ("decoder token-to-image k_proj input", f"{DEC}.cross_attn_token_to_image.k_proj"),
    ("decoder token-to-image v_proj input", f"{DEC}.cross_attn_token_to_image.v_proj"),
    ("decoder image-to-token k_proj input", f"{DEC}.cross_attn_image_to_token.k_proj"),
    ("decoder image-to-token v_proj input", f"{DEC}.cross_attn_image_to_token.v_proj"),
    ("decoder MLP lin1 input", f"{DEC}.mlp.lin1"),
)


def slot_names(depth: int, block: int | None, layer: int) -> dict[str, str]:
    """``{input-quantizer name: title}`` of every CAG layer analysed; ``block`` defaults to the middle one."""
    block = encoder_block(depth, block)
    return {f"{pattern.format(block=block, layer=layer)}.input_quantizer": title
            for title, pattern in CAG_LAYERS}


def channel_window(channels: int, first: int, last: int) -> np.ndarray:
    """Channels ``first..last`` (inclusive) clipped to the layer; every channel when the layer is narrower."""
    if not 0 <= first <= last:
        raise ValueError(f"--channels {first} {last}: need 0 <= FIRST <= LAST")
    if channels <= last - first + 1:
        return np.arange(channels)
    first = min(first, channels - (last - first + 1))
    return np.arange(first, min(last, channels - 1) + 1)


def analyse(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Per CAG layer, ``(quantizer name, statistics)`` with the arrays the figure shows."""
    if args.images < 2:
        raise ValueError("--images must be >= 2: parameters are compared across images")
    _, sam, samples = setup_quantized(args)
    titles = slot_names(len(sam.image_encoder.blocks), args.encoder_block, args.decoder_layer)
    quantizers = find_quantizers(sam, titles, CAGQuantizer)
    acts = capture(sam, list(titles), samples, sam_forward(sam, args.max_boxes))
    results = []
    for name, q in quantizers.items():
        per_sample = acts[name]
        lo, hi = channel_ranges(per_sample)
        scale, zero_point = per_sample_qparams(per_sample, q.bits, q.symmetric, args.observer)
        channels = channel_window(lo.numel(), *args.channels)
        results.append((name, {
            "title": f"{titles[name]}: {name.removesuffix('.input_quantizer')} (A{q.bits})",
            "channels": channels,
            "values": torch.cat(per_sample)[:, channels].numpy(),
            "min": lo.numpy(), "max": hi.numpy(),
            "scale": scale.numpy(), "zero_point": zero_point.numpy(),
            "cosine": pairwise_param_cosine(scale, zero_point, q.bits, q.symmetric)[channels],
            "samples": len(per_sample),
        }))
    return results


def write_figures(results: list[tuple[str, dict]], out: Path) -> list[Path]:
    """One PNG per layer in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, stats in results:
        fig = cag_channel_figure(stats["title"], stats["channels"], stats["values"], stats["cosine"],
                                 stats["samples"])
        paths.append(save_png(fig, out / f"cag_{name.removesuffix('.input_quantizer')}.png"))
    return paths


def run(args: argparse.Namespace) -> None:
    for path in write_figures(analyse(args), args.out):
        print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_help="output folder (one PNG per CAG layer)", images=8)
    p.add_argument("--split", default="train", help="COCO split the images come from")
    p.add_argument("--encoder-block", type=int, default=None, help="encoder block (default: the middle one)")
    p.add_argument("--decoder-layer", type=int, default=0, help="two-way transformer layer")
    p.add_argument("--channels", type=int, nargs=2, default=(50, 100), metavar=("FIRST", "LAST"),
                   help="channel window, inclusive")
    p.add_argument("--observer", default="mse", choices=sorted(OBSERVERS),
                   help="observer that finds each image's optimal per-channel parameters")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
