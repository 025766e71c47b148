"""Benchmark the quantization primitives: forward + backward time on SAM-B activation shapes.

Rows compare our uniform fake-quant with torch's own fake-quant ops (fixed scale: gradient to the input
only; learnable scale: LSQ gradient to the scale too), and the other families with ours on the same tensor:
HLUQ, LNQ and AGQ (gradients to x and their learnable parameters) against uniform per-tensor, grouped CAG
(learnable group scales) against LSQ per-channel. Each pair is timed interleaved in one run (two warm-up
rounds, then the median of repeats), so both sides see the same machine load.

    python tools/bench_quant.py                 # CPU, 2 threads
    python tools/bench_quant.py --device cuda
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from ahcq.quantization import primitives as P

# SAM-B tensors. Global-attention probabilities are 12 x 4096 x 4096 (805 MB); the CPU default uses 1024
# keys per query instead, which keeps the run short and the per-element cost the same.
SHAPES = {
    "enc qkv input": (25, 14, 14, 768),
    "enc MLP hidden": (4096, 3072),
    "dec k (64 boxes)": (64, 4096, 128),
    "attn probs": (12, 1024, 1024),
}
SHAPES_CUDA = {**SHAPES, "attn probs": (12, 4096, 4096)}
WARMUP = 2  # untimed rounds per pair: the first touches fresh memory and is much slower


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable[[], torch.Tensor], grad: torch.Tensor, params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
    fn().backward(grad)


def time_pair(ours: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor], grad: torch.Tensor,
              params: list[torch.Tensor], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median forward+backward milliseconds of ``ours`` and ``ref``, measured alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(WARMUP + repeats):
        for fn, out in ((ours, times[0]), (ref, times[1])):
            _sync(device)
            start = time.perf_counter()
            _step(fn, grad, params)
            _sync(device)
            if i >= WARMUP:
                out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def bench(device: torch.device, repeats: int) -> list[tuple[str, str, float, float, str]]:
    """Rows of (op, shape, ms, ms of the reference, reference name) for every benchmark shape."""
    shapes = SHAPES_CUDA if device.type == "cuda" else SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    label, shape = next(iter(shapes.items()))
    bench_shape(label, shape, gen, 1)  # untimed: thread pool start-up and the allocator's first growth
    return [row for label, shape in shapes.items() for row in bench_shape(label, shape, gen, repeats)]


def bench_shape(label: str, shape: tuple[int, ...], gen: torch.Generator,
                repeats: int) -> list[tuple[str, str, float, float, str]]:
    """The rows of one tensor shape; the families run on the tensors they are meant for."""
    device = gen.device
    bits, qmin, qmax = 4, 0, 15
    channels = shape[-1]
    x = torch.randn(shape, generator=gen, device=device)
    if label == "attn probs":
        x = torch.softmax(x * 4, dim=-1)
    elif label == "enc MLP hidden":
        x = torch.nn.functional.gelu(x)
    x.requires_grad_()
    grad = torch.randn(shape, generator=gen, device=device)
    lo, hi = x.detach().min(), x.detach().max()
    s_t, z_t = P.qparams_from_minmax(lo, hi, bits, False)
    ch_min, ch_max = x.detach().reshape(-1, channels).aminmax(dim=0)
    s_c, z_c = P.qparams_from_minmax(ch_min, ch_max, bits, False)
    z_ti, z_ci, last = z_t.int(), z_c.int(), x.dim() - 1
    size = "x".join(map(str, shape))
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    rows = []

    def add(op: str, ours, ref, ref_name: str, params: list[torch.Tensor]) -> None:
        ms, ref_ms = time_pair(ours, ref, grad, [x, *params], repeats, device)
        rows.append((op, size, ms, ref_ms, ref_name))

    def ours_tensor() -> torch.Tensor:
        return P.fake_quant_uniform(x, s_t, z_t, qmin, qmax)

    def ours_channel() -> torch.Tensor:
        return P.fake_quant_uniform(x, s_c, z_c, qmin, qmax, axis=-1)

    add("uniform per-tensor", ours_tensor,
        lambda: torch.fake_quantize_per_tensor_affine(x, s_t, z_ti, qmin, qmax), "torch per-tensor", [])
    add("uniform per-channel", ours_channel,
        lambda: torch.fake_quantize_per_channel_affine(x, s_c, z_ci, last, qmin, qmax),
        "torch per-channel", [])
    t_learn = s_t.reshape(1).clone().requires_grad_()
    add("LSQ per-tensor", lambda: P.fake_quant_uniform(x, P.grad_scale(t_learn, factor), z_t, qmin, qmax),
        lambda: torch._fake_quantize_learnable_per_tensor_affine(x, t_learn, z_t.reshape(1), qmin, qmax,
                                                                 factor),
        "torch learnable per-tensor", [t_learn])
    c_learn = s_c.clone().requires_grad_()

    def ours_lsq_channel() -> torch.Tensor:
        return P.fake_quant_uniform(x, P.grad_scale(c_learn, factor), z_c, qmin, qmax, axis=-1)

    add("LSQ per-channel", ours_lsq_channel,
        lambda: torch._fake_quantize_learnable_per_channel_affine(x, c_learn, z_c, last, qmin, qmax, factor),
        "torch learnable per-channel", [c_learn])
    if label in ("enc qkv input", "dec k (64 boxes)"):
        groups = 4
        index = torch.arange(channels, device=device) % groups
        g_lo = ch_min.new_full((groups,), math.inf).scatter_reduce(0, index, ch_min, "amin")
        g_hi = ch_max.new_full((groups,), -math.inf).scatter_reduce(0, index, ch_max, "amax")
        g_s, g_z = P.qparams_from_minmax(g_lo, g_hi, bits, False)
        g_s.requires_grad_()
        add("CAG (4 groups)",
            lambda: P.fake_quant_uniform(x, P.grad_scale(P.expand_groups(g_s, index), factor),
                                         P.expand_groups(g_z, index), qmin, qmax, axis=-1),
            ours_lsq_channel, "ours LSQ per-channel", [g_s, c_learn])
    if label == "enc MLP hidden":
        span = (hi - lo).item()
        s1 = torch.tensor(0.1 * span, device=device, requires_grad=True)
        s2 = torch.tensor(0.9 * span / 8, device=device, requires_grad=True)
        add("HLUQ (n_log 8)", lambda: P.fake_quant_hluq(x, lo, s1, s2, 8, bits), ours_tensor,
            "ours per-tensor", [s1, s2])
    if label == "attn probs":
        clip = hi.clone().requires_grad_()
        alpha = torch.tensor(20.0, device=device)
        add("LNQ", lambda: P.fake_quant_lnq(x, clip, alpha, bits), ours_tensor, "ours per-tensor", [clip])
        scale = hi.clone().requires_grad_()
        add("AGQ (tau 2)", lambda: P.fake_quant_agq(x, scale, 2.0, bits), ours_tensor, "ours per-tensor",
            [scale])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per op after the warm-up")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    rows = bench(device, args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"forward+backward, 4 bits, median of {args.repeats} ({where}); ratio = ms / reference ms")
    header = f"{'op':<22} {'shape':<16} {'ms':>9} {'ref ms':>9} {'ratio':>6}  reference"
    print(header)
    print("-" * len(header))
    for op, shape, ms, ref_ms, ref_name in rows:
        print(f"{op:<22} {shape:<16} {ms:>9.2f} {ref_ms:>9.2f} {ms / ref_ms:>6.2f}  {ref_name}")


if __name__ == "__main__":
    main()
