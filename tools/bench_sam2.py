"""Time the SAM 2.1 Hiera-T image encoder (trunk + FPN neck) with W4A4 fake quantization against float.

    python tools/bench_sam2.py --size 512 --repeats 5 --calib-images 1 --config exp/sam2/w4a4.yaml

Random weights and images (timing does not depend on them). The float encoder is upstream sam2 (fused
attention); the quantized one is the same encoder after ``quantize_sam2`` with the AHCQ-SAM SAM2 roles, a
short calibration on random images and hardened AdaRound weights, i.e. the evaluation state. Unless
``--full-calib``, calibration takes min-max weight ranges and two LNQ curvatures instead of the preset's
MSE search and nine curvatures, on ``--calib-size`` images: the encoder's activation quantizers are per
tensor, so this changes only the calibration time, not the quantizer families or the fake-quant ops timed.
Float and quantized forwards alternate so that load from other processes hits both alike; the ratio is of
medians.
``--profile`` adds the time spent inside each quantizer family and in the explicit attention products.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ahcq.models.sam2 import quantize_sam2
from ahcq.models.sam2_attention import QuantHieraAttention
from ahcq.models.sam2_checkpoint import build_sam2_model
from ahcq.quantization import api
from ahcq.quantization.config import ConfigError, QConfig, load_qconfig
from ahcq.quantization.quantizers import AdaRoundQuantizer, Mode

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "exp" / "sam2" / "w4a4.yaml"
FAST_LNQ_ALPHAS = (1.0, 50.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="input side in pixels (multiple of 32; default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median is reported)")
    p.add_argument("--calib-images", type=int, default=1, help="random images for calibration")
    p.add_argument("--calib-size", type=int, default=128, help="calibration image side (multiple of 32)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="quantization YAML")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="time each quantizer family and the attention")
    p.add_argument("--full-calib", action="store_true", help="calibrate with the preset's own searches")
    args = p.parse_args(argv)
    for flag, value in (("--size", args.size), ("--calib-size", args.calib_size)):
        if value < 64 or value % 32:
            p.error(f"{flag} must be a multiple of 32 and >= 64, got {value}")
    if args.repeats < 1 or args.calib_images < 1 or args.threads < 1:
        p.error("--repeats, --calib-images and --threads must be >= 1")
    return args


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class SectionTimer:
    """Wall time spent inside modules, summed per label (forward pre/post hooks; nested time counts twice)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._starts: dict[int, float] = {}

    def attach(self, module: nn.Module, label: str) -> None:
        def pre(mod: nn.Module, *_: object) -> None:
            self._starts[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, *_: object) -> None:
            self.totals[label] += time.perf_counter() - self._starts.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def bench_qconfig(args: argparse.Namespace) -> QConfig:
    """The preset, with the cheap calibration searches unless ``--full-calib``."""
    qconfig = load_qconfig(args.config)
    if args.full_calib:
        return qconfig
    return dataclasses.replace(
        qconfig,
        w_qconfig=dataclasses.replace(qconfig.w_qconfig, observer="minmax"),
        lnq=dataclasses.replace(qconfig.lnq, alphas=FAST_LNQ_ALPHAS),
    )


def build_quantized_encoder(args: argparse.Namespace, qconfig: QConfig) -> tuple[nn.Module, nn.Module, float]:
    """(float encoder, calibrated encoder, calibration seconds)."""
    torch.manual_seed(args.seed)
    model = build_sam2_model("t")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                p.normal_(0.0, 0.02)
    reference = copy.deepcopy(model.image_encoder)
    quantize_sam2(model, qconfig)
    encoder = model.image_encoder
    g = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    with torch.no_grad(), api.calibrating(encoder):
        for _ in range(args.calib_images):
            encoder(torch.randn(1, 3, args.calib_size, args.calib_size, generator=g))
    seconds = time.perf_counter() - start
    for _, q in api.iter_quantizers(encoder):
        if isinstance(q, AdaRoundQuantizer):
            q.harden()
    api.set_mode(encoder, Mode.QUANTIZE)
    api.assert_fully_quantized(encoder)
    return reference, encoder, seconds


def bits_label(qconfig: QConfig) -> str:
    return f"W{qconfig.w_qconfig.bit}A{qconfig.a_qconfig.bit} fq"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        qconfig = bench_qconfig(args)
    except ConfigError as err:
        print(f"bench_sam2: {err}", file=sys.stderr)
        return 2
    reference, encoder, calib_s = build_quantized_encoder(args, qconfig)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 2))
    timer = SectionTimer()
    if args.profile:
        for _, q in api.iter_quantizers(encoder):
            timer.attach(q, f"quantizer {type(q).__name__}")
        for m in encoder.modules():
            if isinstance(m, QuantHieraAttention):
                timer.attach(m, "attention twin (incl. its quantizers and qkv/proj)")
    float_times, quant_times = [], []
    with torch.inference_mode():
        reference(x), encoder(x)  # warm-up
        timer.totals.clear()
        for _ in range(args.repeats):
            float_times.append(timed(lambda: reference(x)))
            quant_times.append(timed(lambda: encoder(x)))
    f_med, q_med = statistics.median(float_times), statistics.median(quant_times)
    print(f"Hiera-T image encoder, input {args.size}x{args.size}, {args.threads} thread(s), "
          f"{args.repeats} repeats, calibration {calib_s:.1f} s on {args.calib_images} image(s) of "
          f"{args.calib_size}x{args.calib_size}")
    for label, med, times in (("float", f_med, float_times), (bits_label(qconfig), q_med, quant_times)):
        print(f"{label:8s} median {med * 1e3:9.1f} ms  (all: {', '.join(f'{t * 1e3:.0f}' for t in times)})")
    print(f"ratio   {q_med / f_med:.3f}")
    if args.profile:
        for label, total in sorted(timer.totals.items(), key=lambda kv: -kv[1]):
            share = total / sum(quant_times)
            print(f"  {label:55s} {total / args.repeats * 1e3:9.1f} ms/forward  {share:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
