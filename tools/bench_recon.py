"""Benchmark of the reconstruction engine on SAM-B shapes (random weights).

(a) time of one reconstruction step of a SAM-B image-encoder block (dim 768, 12 heads, input 1x64x64x768;
    windowed 14x14 by default, ``--global-block`` for a global one), quantized as AHCQ-SAM W4A4 through the
    SAM twin, versus a plain float forward+backward of the same block: the ratio (target <= 1.5);
(b) peak RSS, in a child process, of reconstructing a decoder token->image attention unit (q N x 7 x 256,
    k/v N x 4096 x 256 per image) with ``--boxes`` boxes for ``--images`` images under ``--max-cache-gb``
    (target <= 8 GB); the cache beyond the budget spills to ``--cache-dir``;
(c) total optimizer steps of the SAM-B AHCQ-SAM recipe (units x iterations) next to the references' 680 000.

The default run is sized to take a few minutes on two CPU cores (few steps, two images); the full decoder
case is ``--boxes 300 --images 32`` and needs about 2.5 GB of disk per image in float32, half that with
``--cache-dtype float16``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization.api import calibrating, iter_quantizers, quantization_disabled
from ahcq.quantization.config import load_qconfig
from ahcq.solver.recon import ReconSettings, ReconUnit, reconstruct
from ahcq.solver.recon.cache import STORAGE_DTYPES
from ahcq.solver.recon.train import LossContext

REPO = Path(__file__).resolve().parents[1]
REFERENCE_STEPS = 680_000


class _Stop(Exception):
    """Ends a timing run after enough steps."""


def small_sam(global_block: bool) -> Sam:
    """A SAM-B-shaped model with one encoder block (random weights) and the full mask decoder."""
    encoder = ImageEncoderViT(
        depth=1, embed_dim=768, img_size=1024, mlp_ratio=4, num_heads=12, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=(0,) if global_block else (), window_size=14, out_chans=256,
    )
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    return Sam(encoder, prompt, decoder).eval()


def quantized_sam(config: Path, global_block: bool) -> Sam:
    torch.manual_seed(0)
    return quantize_sam(small_sam(global_block), load_qconfig(config))


def _median_step(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def _plain_steps(block: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    """Median CPU time of forward + loss + backward (weights learn) on the block as it is switched."""
    with torch.no_grad():
        target = block(x) + 0.01
    times = [time.process_time()]
    for _ in range(steps + 1):
        block.zero_grad(set_to_none=True)
        (block(x) - target).pow(2).sum(-1).mean().backward()
        times.append(time.process_time())
    return _median_step(times[1:])


def _recon_steps(block: torch.nn.Module, x: torch.Tensor, config: Path, steps: int,
                 drop_prob: float) -> float:
    """Median CPU time of a reconstruction step of ``block`` by the engine (stopped after ``steps + 1``)."""
    times: list[float] = []

    def clock(ctx: LossContext) -> torch.Tensor:
        times.append(time.process_time())
        if len(times) > steps + 1:
            raise _Stop
        return ctx.output.new_zeros(())

    # the regulariser is on from the first step (as for 80 % of a real unit); the 4 CAG regroups of a unit
    # fall outside the timed steps (a K-means each, amortised over 20 000 steps)
    settings = ReconSettings.from_qconfig(load_qconfig(config), iters=1000, warm_up=0.0, drop_prob=drop_prob)
    try:
        reconstruct(block, [ReconUnit("image_encoder.blocks.0", block)], [x], settings, extra_loss=clock,
                    progress=False)
    except _Stop:
        pass
    return _median_step(times[1:])


def bench_step(config: Path, steps: int, global_block: bool) -> None:
    sam = quantized_sam(config, global_block)
    block = sam.image_encoder.blocks[0]
    x = torch.randn(1, 64, 64, 768)
    with torch.no_grad(), calibrating(block):
        block(x)
    qdrop = _recon_steps(block, x, config, steps, load_qconfig(config).recon.drop_prob)
    brecq = _recon_steps(block, x, config, steps, 1.0)
    learned = {id(p) for _, q in iter_quantizers(block) for p in q.parameters(recurse=False)
               if p.requires_grad}
    weights = [p for p in block.parameters() if id(p) not in learned]
    for p in weights:
        p.requires_grad_(False)
    quantized = _plain_steps(block, x, steps)  # as the engine trains: quantizer parameters only
    for p in weights:
        p.requires_grad_(True)
    with quantization_disabled(block):
        plain = _plain_steps(block, x, steps)
    kind = "global 64x64" if global_block else "windowed 14x14 (25 windows)"
    print(f"(a) SAM-B encoder block, {kind}, AHCQ-SAM W4A4 twin, median CPU time of {steps} steps "
          f"after a warm-up step (--steps for more), {torch.get_num_threads()} thread(s)")
    print(f"    reconstruction step {qdrop:.2f} s, float forward+backward {plain:.2f} s: ratio "
          f"{qdrop / plain:.2f} (target <= 1.5)")
    print(f"    breakdown: fake-quant forward+backward alone {quantized:.2f} s ({quantized / plain:.2f} x "
          f"float), engine step without QDrop (BRECQ) {brecq:.2f} s, QDrop masks {qdrop - brecq:+.2f} s")


def decoder_child(args: argparse.Namespace) -> None:
    """Run in a child process: reconstruct one token->image attention unit and report peak RSS."""
    torch.set_num_threads(args.threads)
    sam = quantized_sam(args.config, False)
    attn = sam.mask_decoder.transformer.layers[1].cross_attn_token_to_image

    def prefix(model: torch.nn.Module, image: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(image)
        q = torch.randn(args.boxes, 7, 256, generator=g)
        keys = torch.randn(args.boxes, 4096, 256, generator=g)
        pe = torch.randn(1, 4096, 256, generator=g)
        return model(q, keys + pe, keys)

    with torch.no_grad(), calibrating(attn):
        g = torch.Generator().manual_seed(10_000)
        keys = torch.randn(8, 4096, 256, generator=g)
        attn(torch.randn(8, 7, 256, generator=g), keys, keys)
    settings = ReconSettings.from_qconfig(load_qconfig(args.config), iters=args.decoder_iters,
                                          chunk_items=args.chunk_items, cache_dtype=args.cache_dtype)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as cache_dir:
        result = reconstruct(attn, [ReconUnit("token_to_image", attn)], list(range(args.images)), settings,
                             forward=prefix, max_cache_gb=args.max_cache_gb, cache_dir=cache_dir,
                             progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "cache_peak": result.peak_cache_bytes,
                      "spilled": result.spilled_bytes, "seconds": time.perf_counter() - start,
                      "steps": result.reports[0].steps}))


def bench_memory(args: argparse.Namespace) -> None:
    cmd = [sys.executable, __file__, "--decoder-child", "--boxes", str(args.boxes),
           "--images", str(args.images),
           "--max-cache-gb", str(args.max_cache_gb), "--chunk-items", str(args.chunk_items),
           "--decoder-iters", str(args.decoder_iters), "--config", str(args.config), "--threads",
           str(args.threads), "--cache-dtype", args.cache_dtype]
    if args.cache_dir:
        cmd += ["--cache-dir", str(args.cache_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    stats = json.loads(out)
    gb = 2**30
    print(f"(b) decoder token->image unit, {args.boxes} boxes x {args.images} images, chunks of "
          f"{args.chunk_items} boxes, {stats['steps']} steps, --max-cache-gb {args.max_cache_gb}, cache in "
          f"{args.cache_dtype}")
    print(f"    peak RSS {stats['peak_rss'] / gb:.2f} GB (target <= 8), cache in memory "
          f"{stats['cache_peak'] / gb:.2f} GB, spilled to disk {stats['spilled'] / gb:.2f} GB, "
          f"{stats['seconds']:.0f} s")


def sam_b_units() -> dict[str, int]:
    """Unit counts of SAM-B: reference sub-blocks, whole blocks, SAQ-SAM stages."""
    with torch.device("meta"):
        from segment_anything import sam_model_registry
        sam = sam_model_registry["vit_b"]()
    names = [n for n, _ in sam.named_modules()]
    blocks = list(sam.image_encoder.blocks)
    prefix = "mask_decoder.transformer.layers."
    dec_layers = sum(1 for n in names if n.count(".") == 3 and n.startswith(prefix))
    global_blocks = sum(1 for b in blocks if b.window_size == 0)
    return {
        "sub-blocks (reference)": 2 * len(blocks) + 1 + 4 * dec_layers + 1,
        "blocks": len(blocks) + 1 + dec_layers + 1,
        "stages (SAQ-SAM)": global_blocks + 1 + dec_layers + 1,
    }


def bench_steps(config: Path) -> None:
    iters = load_qconfig(config).recon.iters
    print(f"(c) SAM-B AHCQ-SAM optimizer steps ({config.name}: recon.iters = {iters}; references: 34 x 20000 "
          f"= {REFERENCE_STEPS})")
    for name, units in sam_b_units().items():
        total = units * iters
        print(f"    units = {name}: {units} x {iters} = {total} ({total / REFERENCE_STEPS:.2f} x reference)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    parser.add_argument("--config", type=Path, default=REPO / "exp" / "config44.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps in (a)")
    parser.add_argument("--global-block", action="store_true", help="(a) on a global-attention block")
    parser.add_argument("--boxes", type=int, default=300)
    parser.add_argument("--images", type=int, default=2, help="(b) images; 32 for the full case")
    parser.add_argument("--chunk-items", type=int, default=25, help="(b) boxes per cached chunk / step")
    parser.add_argument("--decoder-iters", type=int, default=4)
    parser.add_argument("--max-cache-gb", type=float, default=2.0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--cache-dtype", default="float32", choices=sorted(STORAGE_DTYPES),
                        help="(b) storage type of the cached activations (recon.cache_dtype)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decoder-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decoder_child:
        decoder_child(args)
        return
    torch.set_num_threads(args.threads)
    if "a" in args.parts:
        bench_step(args.config, args.steps, args.global_block)
    if "b" in args.parts:
        bench_memory(args)
    if "c" in args.parts:
        bench_steps(args.config)


if __name__ == "__main__":
    main()
