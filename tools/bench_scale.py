"""Scale-out on one machine: test_quant.py in 1 process against ``torchrun --nproc_per_node N``, side by side.

    python tools/bench_scale.py --ranks 2 --threads 1

Prints, from one invocation, (1) the speed-up of preparing the feature cache and evaluating (the stages
``cache`` + ``fp_eval`` of results.json's timings: prompts, encoder inputs and the float evaluation of the
demo val set, every rank on its share of the images) with N ranks x ``--threads`` against 1 rank x
``--threads``, and (2) the reconstruction step: seconds per step of the demo recipe's units with N
data-parallel ranks (each a batch of its own images, gradients averaged) against 1, and the throughput.
Each side starts from an empty feature cache; ``--repeats`` alternates the two and reports the medians.
Needs the demo (``python tools/make_demo_data.py``, ``ckpt/tiny_sam.pth``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ahcq" / "solver" / "test_quant.py"


def run(ranks: int, threads: int, out: Path, cache: Path, extra: list[str], port: int) -> dict:
    """results.json of one test_quant.py run with ``ranks`` processes."""
    launcher = [sys.executable, str(SCRIPT)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
        str(port), str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, "--threads", str(threads), "--out", str(out), "--cache-dir", str(cache),
                           *extra], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_scale.py: a run with {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def step_seconds(results: dict) -> float:
    """Seconds per reconstruction step over every unit of a run."""
    units = results["calibration"]["reconstruction"]["report"]["units"]
    return sum(u["seconds"] for u in units) / max(sum(u["steps"] for u in units), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--limit", type=int, help="evaluate the first N demo val images (default: all)")
    p.add_argument("--calib-images", type=int, default=8)
    p.add_argument("--recon-iters", type=int, default=20)
    args = p.parse_args(argv)
    if min(args.ranks, args.threads, args.repeats, args.calib_images, args.recon_iters) < 1 or args.ranks < 2:
        p.error("--ranks must be >= 2; --threads, --repeats, --calib-images and --recon-iters >= 1")
    limit = ["--limit", str(args.limit)] if args.limit else []
    evals: dict[int, list[float]] = {1: [], args.ranks: []}
    steps: dict[int, list[float]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        for i in range(args.repeats):
            for ranks in (1, args.ranks):
                tag = Path(tmp) / f"r{ranks}_{i}"
                fp = run(ranks, args.threads, tag / "fp", tag / "cache", ["--fp-only", *limit], 29700 + i)
                evals[ranks].append(fp["timings_s"]["cache"] + fp["timings_s"]["fp_eval"])
                quant = run(ranks, args.threads, tag / "quant", tag / "cache",
                            ["--skip-fp", "--limit", "1", "--calib-images", str(args.calib_images),
                             "--recon-iters", str(args.recon_iters)], 29750 + i)
                steps[ranks].append(step_seconds(quant))
    one, many = statistics.median(evals[1]), statistics.median(evals[args.ranks])
    s1, sn = statistics.median(steps[1]), statistics.median(steps[args.ranks])
    print(f"{args.ranks} ranks x {args.threads} thread(s) against 1 rank x {args.threads}, median of "
          f"{args.repeats}")
    print(f"feature cache + float evaluation: {one:.1f} s -> {many:.1f} s   speed-up {one / many:.2f}x")
    print(f"reconstruction step ({args.calib_images} calibration images): {s1 * 1e3:.1f} ms -> "
          f"{sn * 1e3:.1f} ms per step ({sn / s1:.2f}x the time for {args.ranks}x the images per step: "
          f"{args.ranks * s1 / sn:.2f}x the throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
