"""Quantize SAM2 and evaluate it on video object segmentation (SA-V / DAVIS layouts, J&F).

    python ahcq/solver/test_quant_video.py --config projects/configs/sam2/sam2.1_hiera_t_davis17_val.yaml \\
        --q_config exp/sam2/w4a4.yaml --calib-videos 8 --calib-frames 4

Without --config it runs the tiny demo (projects/configs/sam2/demo_tiny.yaml: a reduced, randomly initialised
SAM 2.1 on generated moving-shape clips; the numbers only show that the pipeline works). ``--config`` is a
video-run YAML of ours (schema in projects/configs/sam2/demo_tiny.yaml) or a sam2 config name / size (t, s,
b+, l), which then needs --checkpoint and --data-root. Every object is prompted with its GT mask on its first
annotated frame and tracked forward; masks are probabilities > 0.5. Calibration tracks N seeded videos for K
frames each. Writes ``results.json`` (float and quantized J, F, J&F under the official and the AHCQ-SAM
protocol, resolved configs, seed, timings) to ``--out`` and prints both side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException

from ahcq.models.half_weights import prepare_weights
from ahcq.models.sam2 import quantize_sam2
from ahcq.models.sam2_checkpoint import build_sam2_model, load_sam2, resolve_config, run_overrides
from ahcq.models.sam2_roles import sam2_big_sites
from ahcq.quantization.config import ConfigError, QConfig, ReconUnits, load_qconfig
from ahcq.seeding import seed_everything
from ahcq.solver.cli import Interrupted, UserError, add_run_arguments, positive, quiet_third_party, run_cli
from ahcq.solver.ptq import PTQModel, run_ptq
from ahcq.solver.recon.sam2 import reconstruct_video
from ahcq.solver.recon.settings import ReconSettings
from ahcq.solver.results import RESULTS_NAME, write_json
from ahcq.solver.run_checks import RunInputError, check_finite_weights
from ahcq.solver.run_identity import RunFolder, RunMismatch, code_version, digest, weights_digest
from ahcq.video import VOSReport, evaluate, read_dataset
from ahcq.video.calibration import CalibrationClip, select_clips, track_clip
from ahcq.video.fixtures import make_moving_shapes_clip
from ahcq.video.propagation import TrackedPredictions, TrackOptions
from ahcq.yaml_schema import SchemaError, bad_value, check_keys, expand_env, read_yaml, require_mapping

logger = logging.getLogger("ahcq.solver.test_quant_video")
REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = Path("projects/configs/sam2/demo_tiny.yaml")
_SECTIONS = {
    "model": {"config", "checkpoint", "overrides", "reduced"},
    "dataset": {"root", "layout", "split", "generate"},
    "calibration": {"root", "layout", "split", "videos", "frames"},
    "tracking": {"threshold", "offload_video", "offload_state"},
}
_UNSUPPORTED = (
    ("pcc.enabled", lambda q: q.pcc.enabled),
    ("par.enabled", lambda q: q.par.enabled),
    ("attention.rel_pos_float_q", lambda q: q.attention.rel_pos_float_q),
)


@dataclass
class VideoRunOptions:
    """Everything a run depends on (the CLI's arguments, resolved)."""

    config: str
    q_config: Path | None
    out: Path
    checkpoint: Path | None = None
    data_root: Path | None = None
    layout: str | None = None
    split: str | None = None
    seed: int | None = None
    device: str = "cpu"
    calib_videos: int | None = None
    calib_frames: int | None = None
    limit: int | None = None
    fp_only: bool = False
    skip_fp: bool = False
    recon_iters: int | None = None
    overwrite: bool = False
    keep_state: bool = False


def _read_config(config: str) -> tuple[dict[str, Any], str]:
    """The run config as a dict (a YAML of ours, or a sam2 config name with nothing else), and its name."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        source = str(path)
        try:
            data = require_mapping(source, "", read_yaml(path) or {})
            check_keys(source, "", data, _SECTIONS)
            for key, value in data.items():
                check_keys(source, key, require_mapping(source, key, value), sorted(_SECTIONS[key]))
        except SchemaError as err:
            raise UserError(str(err)) from None
        try:
            return expand_env(data), source
        except SchemaError as err:
            raise UserError(f"{source}: {err}") from None
    try:
        resolve_config(config)
    except ValueError as err:
        raise UserError(f"--config {config!r}: no such YAML file and not a sam2 config ({err})") from None
    return {"model": {"config": config}}, config


def _resolve(opts: VideoRunOptions) -> dict[str, Any]:
    """The run config with the CLI's overrides applied and every required value present."""
    data, source = _read_config(opts.config)
    cfg = {section: dict(data.get(section) or {}) for section in _SECTIONS}
    cfg["source"] = source
    for key, value in (("checkpoint", opts.checkpoint),):
        if value is not None:
            cfg["model"][key] = str(value)
    for key, value in (("root", opts.data_root), ("layout", opts.layout), ("split", opts.split)):
        if value is not None:
            cfg["dataset"][key] = str(value)
    if "config" not in cfg["model"]:
        raise UserError(f"{source}: model.config (a sam2 config name or size) is missing")
    if "checkpoint" not in cfg["model"]:
        raise UserError(f"{source}: no checkpoint (model.checkpoint or --checkpoint; null = random weights)")
    if "root" not in cfg["dataset"]:
        raise UserError(f"{source}: no dataset root (dataset.root or --data-root)")
    model = cfg["model"]
    if not isinstance(model.get("overrides", []), list) or not isinstance(model.get("reduced", {}), dict):
        raise UserError(f"{source}: model.overrides must be a list of hydra overrides, model.reduced a map")
    cfg["dataset"].setdefault("layout", "sav")
    if cfg["dataset"]["layout"] not in ("sav", "davis"):
        raise UserError(f"{source}: dataset.layout must be 'sav' or 'davis', "
                        f"got {cfg['dataset']['layout']!r}")
    for key in ("root", "layout", "split"):
        cfg["calibration"].setdefault(key, cfg["dataset"].get(key))
    _check_values(cfg, source)
    return cfg


_VALUES: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("tracking", "threshold", lambda v: _number(v) and 0.0 < v < 1.0, "a probability in (0, 1)"),
    ("tracking", "offload_video", lambda v: isinstance(v, bool), "true or false"),
    ("tracking", "offload_state", lambda v: isinstance(v, bool), "true or false"),
    ("calibration", "videos", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
     "a positive integer"),
    ("calibration", "frames", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
     "a positive integer"),
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(cfg: dict[str, Any], source: str) -> None:
    """The typed values of the run config, checked where they are read (a string is no boolean)."""
    for section, key, ok, expected in _VALUES:
        if key in cfg[section] and not ok(cfg[section][key]):
            raise UserError(str(bad_value(source, f"{section}.{key}", cfg[section][key], expected)))


def _load_qconfig(opts: VideoRunOptions) -> QConfig | None:
    if opts.fp_only:
        return None
    if not opts.q_config.is_file():
        raise UserError(f"--q_config: file not found: {opts.q_config}")
    try:
        qconfig = load_qconfig(opts.q_config)
    except ConfigError as err:
        raise UserError(f"--q_config: {err}") from None
    bad = [key for key, on in _UNSUPPORTED if on(qconfig)]
    if bad:
        raise UserError(f"--q_config {opts.q_config}: {', '.join(bad)} is not available in the video "
                        "pipeline (SAM-only steps); switch it off for SAM2")
    if qconfig.recon.enabled and qconfig.recon.units is ReconUnits.STAGES:
        raise UserError(f"--q_config {opts.q_config}: recon.units 'stages' is not defined for SAM2; use "
                        "'blocks' or 'layers'")
    if qconfig.recon.enabled and qconfig.recon.batch_size != 1:
        raise UserError(f"--q_config {opts.q_config}: recon.batch_size {qconfig.recon.batch_size}: SAM2 "
                        "reconstruction takes one tracked call per step; use 1")
    if opts.recon_iters is not None:
        recon = dataclasses.replace(qconfig.recon, iters=opts.recon_iters, iters_cams=opts.recon_iters)
        qconfig = dataclasses.replace(qconfig, recon=recon)
    return qconfig if opts.seed is None else dataclasses.replace(qconfig, seed=opts.seed)


def _generate(dataset: dict[str, Any]) -> None:
    """Write the demo's moving-shape clips when ``dataset.generate`` asks for them and the root is absent.

    The clips are made in a temporary sibling folder and renamed into place, so a failed run leaves none.
    """
    spec = dict(dataset["generate"])
    root = Path(dataset["root"])
    if root.exists():
        return
    size = tuple(spec.pop("size", (72, 96)))
    videos = int(spec.pop("videos", 3))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for v in range(videos):
            make_moving_shapes_clip(tmp, dataset["layout"], size=size, seed=v, video=f"shapes{v:02d}",
                                    split=dataset.get("split") or "val", **spec)
        os.replace(tmp, root)
    except TypeError as err:
        raise UserError(f"dataset.generate: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _datasets(cfg: dict[str, Any], opts: VideoRunOptions, need_calib: bool) -> tuple[list, list]:
    if cfg["dataset"].get("generate"):
        _generate(cfg["dataset"])
    found = {}
    for section in ("dataset", "calibration") if need_calib else ("dataset",):
        d = cfg[section]
        try:
            found[section] = read_dataset(d["root"], d["layout"], d.get("split"))
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"{section}: {err}") from None
    samples = found["dataset"]
    return samples[: opts.limit] if opts.limit else samples, found.get("calibration", [])


def _build(cfg: dict[str, Any], seed: int, device: torch.device) -> tuple[torch.nn.Module, list[str]]:
    """The video predictor on ``device`` and the hydra overrides it was built with."""
    model = cfg["model"]
    try:
        overrides = run_overrides(model)
        if model.get("checkpoint") is None:
            torch.manual_seed(seed)
            logger.warning("model.checkpoint is null: randomly initialised SAM2 (demo numbers only)")
            predictor = build_sam2_model(model["config"], overrides, video=True)
        else:
            predictor = load_sam2(model["config"], model["checkpoint"], overrides, video=True)
    except (FileNotFoundError, ValueError, TypeError, HydraException) as err:
        raise UserError(f"model: {err}") from None
    try:
        check_finite_weights(predictor, f"SAM2 checkpoint {model.get('checkpoint') or '(random init)'}")
    except RunInputError as err:
        raise UserError(str(err)) from None
    return predictor.to(device).eval(), overrides


def sam2_ptq(predictor: torch.nn.Module, clips: list, options: TrackOptions) -> PTQModel:
    """SAM2 in the PTQ recipe: a calibration sample is a clip tracked frame by frame; BIG decides on the first
    clip, as the AHCQ-SAM SAM2 code does on one video; reconstruction along the quantized tracking chain."""
    def reconstruct(samples: Sequence[CalibrationClip], qconfig: QConfig, state_dir: Path | None) -> dict:
        return reconstruct_video(predictor, ReconSettings.from_qconfig(qconfig), samples, options,
                                 units=qconfig.recon.units, state_dir=state_dir)

    return PTQModel(
        model=predictor,
        quantize=lambda qconfig: quantize_sam2(predictor, qconfig),
        forward=lambda clip: track_clip(predictor, clip, options),
        big_sites=lambda: sam2_big_sites(predictor),
        big_samples=1,
        reconstruct=reconstruct,
    )


def _quantize(predictor: torch.nn.Module, qconfig: QConfig, clips: list, options: TrackOptions,
              timer: dict[str, float], staging: Path) -> dict[str, Any]:
    """The PTQ recipe (``run_ptq``) on the calibration clips; the evaluation state."""
    report = run_ptq(sam2_ptq(predictor, clips, options), clips, qconfig, staging / "recon_state", timer)
    return {"videos": [c.sample.name for c in clips], "frames": clips[0].frames, **report}


def _clips(cfg: dict[str, Any], opts: VideoRunOptions, qconfig: QConfig, pool: list, seed: int) -> list:
    """N videos x K frames: from the CLI, else the run config, else the q_config's ``calibrate: {sample,
    frame}``, else 8 videos and calibrate / N frames."""
    framed = qconfig.calibrate_frames is not None
    default_n = qconfig.calibrate if framed else min(8, len(pool))
    try:
        n = opts.calib_videos or cfg["calibration"].get("videos", default_n)
        default_k = qconfig.calibrate_frames if framed else max(1, qconfig.calibrate // max(n, 1))
        k = opts.calib_frames or cfg["calibration"].get("frames", default_k)
        return select_clips(pool, n, k, seed)
    except ValueError as err:
        raise UserError(f"calibration: {err}") from None


def _evaluate(predictor: torch.nn.Module, samples: list, options: TrackOptions) -> VOSReport:
    """Track and score video by video (only one video's masks in memory)."""
    return evaluate(samples, TrackedPredictions(predictor, options), progress=True)


def _tree_digest(root: Path) -> str:
    """Path, size and modification time of every file under ``root`` (frames and annotations)."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return digest([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _identity(cfg: dict[str, Any], opts: VideoRunOptions, qconfig: QConfig | None, predictor: torch.nn.Module,
              overrides: list[str], clips: list, options: TrackOptions, seed: int, device: torch.device,
              samples: list) -> dict[str, Any]:
    """Everything that decides this run's results (see ``run_identity``)."""
    roots = {section: cfg[section].get("root") for section in ("dataset", "calibration")}
    return {
        "model": digest({"config": cfg["model"].get("config"), "overrides": overrides}),
        "weights": weights_digest(predictor),
        "data": digest({s: _tree_digest(Path(r)) if r else None for s, r in roots.items()}
                       | {"videos": [v.name for v in samples]}),
        "qconfig": digest({**qconfig.to_dict(), **qconfig.derived()}) if qconfig is not None else None,
        "calibration": [(c.sample.name, c.frames) for c in clips],
        "tracking": dataclasses.asdict(options),
        "evaluations": "fp" if opts.fp_only else "quant" if opts.skip_fp else "fp+quant",
        "seed": seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "code": code_version(),
    }


def run(opts: VideoRunOptions) -> dict[str, Any]:
    """One float (+ quantized) VOS evaluation in a staging folder moved to ``--out`` when it has finished;
    an interrupted run of the same inputs resumes, a folder holding another run is refused."""
    try:
        return _run(opts)
    except RunMismatch as err:
        raise UserError(str(err)) from None


def _run(opts: VideoRunOptions) -> dict[str, Any]:
    started = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the video CLI runs in one process; torchrun splits test_quant.py runs only")
    for path, option in ((opts.out, "--out"),):
        if path.exists() and not path.is_dir():
            raise UserError(f"{option} {path} is a file, not a folder")
    cfg = _resolve(opts)
    qconfig = _load_qconfig(opts)
    seed = opts.seed if opts.seed is not None else (qconfig.seed if qconfig else 0)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    device = torch.device(opts.device)
    seed_everything(seed)
    samples, calib_pool = _datasets(cfg, opts, qconfig is not None)
    clips = _clips(cfg, opts, qconfig, calib_pool, seed) if qconfig is not None else []
    tracking = cfg["tracking"]
    options = TrackOptions(threshold=float(tracking.get("threshold", 0.5)),
                           offload_video=tracking.get("offload_video", True),
                           offload_state=tracking.get("offload_state", True))
    timer: dict[str, float] = {}
    start = time.perf_counter()
    predictor, overrides = _build(cfg, seed, device)
    try:
        prepare_weights(predictor, qconfig)
    except ValueError as err:
        raise UserError(f"--q_config {opts.q_config}: {err}") from None
    timer["build"] = time.perf_counter() - start
    identity = _identity(cfg, opts, qconfig, predictor, overrides, clips, options, seed, device, samples)
    folder = RunFolder(opts.out, identity, opts.overwrite)
    finished = folder.finished()
    if finished is not None:
        logger.info("%s already holds this run (same fingerprint); nothing to do (--overwrite reruns it)",
                    opts.out)
        return finished
    staging, resumed = folder.open()
    if resumed:
        logger.info("resuming the interrupted run kept in %s", staging)
    try:
        fp, quant, calib_report = _work(predictor, qconfig, samples, clips, options, timer, staging,
                                        not opts.skip_fp)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; run the same command again to resume (state kept in {staging})") \
            from None
    timer["total"] = time.perf_counter() - started
    results = {
        "fp": fp, "quant": quant,
        "config": cfg, "q_config": qconfig.to_dict() if qconfig else None,
        "q_config_source": str(opts.q_config) if qconfig else None,
        "sam2_overrides": overrides, "seed": seed, "device": str(device), "videos": [s.name for s in samples],
        "calibration": calib_report, "tracking": dataclasses.asdict(options),
        "timings_s": {k: round(v, 3) for k, v in timer.items()},
        "identity": identity, "overrides": {"recon_iters": opts.recon_iters},
    }
    write_json(staging / RESULTS_NAME, results)
    folder.commit(staging, keep=("recon_state",) if opts.keep_state else ())
    print(format_table(fp, quant))
    return results


def _work(predictor: torch.nn.Module, qconfig: QConfig | None, samples: list, clips: list,
          options: TrackOptions, timer: dict[str, float], staging: Path, with_fp: bool = True
          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """Float evaluation (unless ``with_fp`` is off; kept from an interrupted run when it finished), then
    quantize and evaluate."""
    progress_file = staging / "progress.json"
    fp = None
    if with_fp:
        try:
            fp = json.loads(progress_file.read_text())["fp"]
            logger.info("float evaluation: kept from the interrupted run")
        except (OSError, ValueError, KeyError):
            start = time.perf_counter()
            fp = _evaluate(predictor, samples, options).as_dict()
            timer["fp_eval"] = time.perf_counter() - start
            write_json(progress_file, {"fp": fp})
    quant, calib_report = None, None
    if qconfig is not None:
        calib_report = _quantize(predictor, qconfig, clips, options, timer, staging)
        start = time.perf_counter()
        quant = _evaluate(predictor, samples, options).as_dict()
        timer["quant_eval"] = time.perf_counter() - start
    return fp, quant, calib_report


def format_table(fp: dict[str, Any] | None, quant: dict[str, Any] | None) -> str:
    """Float and quantized J&F, J and F per protocol, side by side."""
    def cells(r: dict[str, Any] | None, key: str) -> list[str]:
        if r is None or r.get(f"{key}/J&F") is None:
            return ["-"] * 3
        return [f"{r[f'{key}/J&F']:.2f}", f"{r[f'{key}/J']:.2f}", f"{r[f'{key}/F']:.2f}"]
    widths = (10, 11, 7, 7, 11, 7, 7)
    rows = [("protocol", "float J&F", "J", "F", "quant J&F", "J", "F")]
    rows += [(key, *cells(fp, key), *cells(quant, key)) for key in ("official", "ahcq")]
    return "\n".join(f"{row[0]:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:]))
                     for row in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test_quant_video.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"video-run YAML or sam2 config name/size (default: {DEMO_CONFIG})")
    p.add_argument("--q_config", type=Path, help="quantization YAML (required unless --fp-only)")
    p.add_argument("--checkpoint", type=Path, help="SAM 2.1 checkpoint (overrides the YAML's)")
    p.add_argument("--data-root", type=Path, help="evaluation dataset root (overrides the YAML's)")
    p.add_argument("--layout", choices=("sav", "davis"), help="dataset layout (overrides the YAML's)")
    p.add_argument("--split", help="split name (overrides the YAML's)")
    add_run_arguments(p)
    p.add_argument("--calib-videos", type=positive, help="calibration videos N (default: the YAML's, or 8)")
    p.add_argument("--calib-frames", type=positive,
                   help="tracked frames K per calibration video (default: the YAML's, or calibrate / N)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N videos")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fp-only", action="store_true", help="evaluate the float model only")
    mode.add_argument("--skip-fp", action="store_true", help="do not evaluate the float model")
    return p


def _options(args: argparse.Namespace) -> VideoRunOptions:
    config = args.config or str(DEMO_CONFIG if DEMO_CONFIG.is_file() else REPO / DEMO_CONFIG)
    if args.q_config is None and not args.fp_only:
        raise UserError("--q_config is required (or pass --fp-only to evaluate the float model only)")
    q_stem = args.q_config.stem if args.q_config else "fp"
    out = args.out or Path("runs") / f"{Path(config).stem}__{q_stem}"
    return VideoRunOptions(
        config=config, q_config=args.q_config, out=out, checkpoint=args.checkpoint, data_root=args.data_root,
        layout=args.layout, split=args.split, seed=args.seed, device=args.device,
        calib_videos=args.calib_videos, calib_frames=args.calib_frames, limit=args.limit,
        fp_only=args.fp_only, skip_fp=args.skip_fp, recon_iters=args.recon_iters, overwrite=args.overwrite,
        keep_state=args.keep_state,
    )


def _start(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; user errors exit non-zero with a one-line message naming the culprit."""
    quiet_third_party()
    return run_cli("test_quant_video.py", _parser().parse_args(argv), _start)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
