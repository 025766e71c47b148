"""Speed and size of the quantized SAM in ONNX Runtime (CPU) against the float model in the same runtime,
measured side by side in one run.

    python tools/bench_deploy.py --threads 2

SAM-B-shaped random weights (``build_sam("vit_b")``, seed 0). The float model is exported as it is; each
recipe (default: exp/deploy/w8a8.yaml and w4a8.yaml) is applied to a copy, calibrated on one random image
(``bench_pack.calibrate_random``) and exported by ``ahcq.deploy.onnx_export`` (integer Linear layers as ONNX
Runtime's MatMulIntegerToFloat, the other sites as QuantizeLinear / DequantizeLinear). Times: the image
encoder on one 1024x1024 image and the mask decoder on ``--boxes`` box prompts, each the median of
``--repeats`` runs after one warm-up, on ``--threads`` intra-op threads. Which kernels ran, and where the
time went, comes from ONNX Runtime's own profiler (one profiled run per graph).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from bench_pack import calibrate_random

from ahcq.deploy.onnx_export import DECODER_INPUTS, export_onnx
from ahcq.deploy.onnx_runtime import graph_ops, session
from ahcq.models import build_sam, quantize_sam
from ahcq.quantization.config import load_qconfig


def feeds(sam: torch.nn.Module, boxes: int) -> dict[str, dict[str, np.ndarray]]:
    """Seeded inputs of both graphs: one image, and ``boxes`` box prompts on a random embedding."""
    g = torch.Generator().manual_seed(1)
    size = sam.image_encoder.img_size
    image = torch.randn(1, 3, size, size, generator=g)
    h, w = sam.prompt_encoder.image_embedding_size
    corner = torch.rand(boxes, 2, generator=g) * size * 0.6
    box = torch.cat([corner, corner + size * 0.1 + torch.rand(boxes, 2, generator=g) * size * 0.3], 1)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
    embedding = torch.randn(1, sam.prompt_encoder.embed_dim, h, w, generator=g)
    decoder = dict(zip(DECODER_INPUTS, (embedding, pe, sparse, dense)))
    return {"image_encoder": {"image": image.numpy()},
            "mask_decoder": {k: np.ascontiguousarray(v.detach().numpy()) for k, v in decoder.items()}}


def time_graph(path: Path, feed: dict[str, np.ndarray], threads: int, repeats: int) -> float:
    """Median seconds of one run, after a warm-up run."""
    sess = session(path, threads)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_profile(path: Path, feed: dict[str, np.ndarray], threads: int, top: int = 4) -> list[str]:
    """The operators that took the most time in one profiled run: ``op (share of node time)``."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = threads
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    spent: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            spent[e["args"].get("op_name", "?")] += e.get("dur", 0)
    total = sum(spent.values()) or 1
    return [f"{op} {100 * d / total:.0f}%" for op, d in spent.most_common(top)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", type=Path, nargs="+",
                   default=[Path("exp/deploy/w8a8.yaml"), Path("exp/deploy/w4a8.yaml")])
    p.add_argument("--boxes", type=int, default=100, help="box prompts of the decoder run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    fp = build_sam("vit_b").eval()
    inputs = feeds(fp, args.boxes)
    print(f"SAM-B shape, random weights; ONNX Runtime {ort.__version__}, CPUExecutionProvider, "
          f"{args.threads} threads; encoder on one 1024x1024 image, decoder on {args.boxes} boxes; median of "
          f"{args.repeats} runs\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"FP32": fp}
        for recipe in args.recipes:
            quant = copy.deepcopy(fp)
            quantize_sam(quant, load_qconfig(recipe), quant_encoder=True)
            calibrate_random(quant)
            models[recipe.stem.upper()] = quant
        base: dict[str, float] = {}
        for name, model in models.items():
            files = export_onnx(model, Path(tmp) / name, quant_encoder=True)
            for part, path in files.items():
                seconds = time_graph(path, inputs[part], args.threads, args.repeats)
                base.setdefault(part, seconds)
                rows.append((part, name, seconds, base[part] / seconds, path.stat().st_size / 2**20,
                             graph_ops(path), kernel_profile(path, inputs[part], args.threads)))
                print(f"  measured {part} {name}: {seconds:.3f} s", file=sys.stderr, flush=True)
    print("| graph | model | seconds | speed-up vs FP32 | file | quantization ops | most time in |")
    print("| :-- | :-- | --: | --: | --: | :-- | :-- |")
    for part, name, seconds, ratio, mib, ops, kernels in rows:
        shown = ", ".join(f"{op} {n}" for op, n in ops.items()) or "-"
        print(f"| {part} | {name} | {seconds:.3f} | {ratio:.2f}x | {mib:.1f} MiB | {shown} "
              f"| {', '.join(kernels)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
