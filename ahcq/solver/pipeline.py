"""One PTQ run of SAM on COCO: build -> cache prompts and encoder inputs -> float eval -> quantize,
calibrate, (reconstruct) -> quantized eval -> ``results.json``.

Everything the user can get wrong (paths, config, qconfig, checkpoints and their values, annotation and
image files, device, a ``--out`` that holds another run) is checked before the first expensive step and
raised as :class:`UserError`, which the CLI prints without a traceback.

The run works in a staging folder and moves it to ``--out`` when it has finished (``run_identity``): a
rerun with the same inputs resumes an interrupted run (float results kept, reconstruction from its last
finished unit), and a rerun with other inputs is refused instead of reporting the old model. The
fingerprint (weights, prompt source, data, resolved quantization config, calibration draw, seed, CPU
threads, device, code) is recorded in ``results.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mmcv
import mmdet
import torch
from mmdet.models import build_detector

import ahcq
from ahcq.deploy import pack_model
from ahcq.deploy.onnx_export import OPSET, OnnxExportError, export_onnx
from ahcq.deploy.onnx_runtime import graph_ops, running_in_onnxruntime
from ahcq.models.half_weights import prepare_weights
from ahcq.models.image_runner import is_sam2
from ahcq.progress import progress_bar
from ahcq.quantization.config import ConfigError, QConfig, load_qconfig
from ahcq.seeding import calibration_indices, seed_everything
from ahcq.solver.cli import Interrupted, UserError
from ahcq.solver.evaluation import NonFiniteOutput, build_split, evaluate, pipeline_items
from ahcq.solver.feature_cache import CacheStats, FeatureCache, module_fingerprint, run_key
from ahcq.solver.image_ptq import CalibSample, image_ptq
from ahcq.solver.ptq import run_ptq
from ahcq.solver.ranks import Ranks, init_ranks
from ahcq.solver.results import format_table, write_json
from ahcq.solver.run_checks import (
    RunInputError,
    check_annotations,
    check_config_files,
    check_finite_weights,
    check_folder,
    check_image_files,
)
from ahcq.solver.run_identity import RunFolder, RunMismatch, code_version, digest, weights_digest

__all__ = ["Interrupted", "RunOptions", "UserError", "calibration_choice", "run"]

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_QCONFIG = Path("exp/config44.yaml")
MAX_MESSAGE = 600
PROGRESS = "progress.json"
PACKED_FILE = "quantized.npz"
ONNX_DIR = "onnx"
BACKENDS = ("torch", "onnxruntime")


@dataclass
class RunOptions:
    """Everything a run depends on (the CLI's arguments, resolved). ``q_config``, ``quant_encoder`` and
    ``out`` left as ``None`` take the mmdet config's ``ahcq_defaults`` (the demo config has them), else
    ``exp/config44.yaml``, a float encoder and ``runs/<config>__<q_config>``."""

    config: Path
    q_config: Path | None
    out: Path | None
    cache_dir: Path
    quant_encoder: bool | None = None
    seed: int | None = None
    device: str = "cpu"
    calib_images: int | None = None
    calib_max_boxes: int = 32
    limit: int | None = None
    fp_only: bool = False
    skip_fp: bool = False
    recon_iters: int | None = None
    overwrite: bool = False
    keep_state: bool = False
    pack: bool = False
    backend: str = "torch"
    cfg_options: dict[str, Any] = field(default_factory=dict)


def _load_config(opts: RunOptions) -> mmcv.Config:
    if not opts.config.is_file():
        raise UserError(f"--config: no such mmdet config {str(opts.config)!r}")
    if opts.config.suffix == ".py":  # checked here: mmcv's own syntax error leaves a temp-file traceback
        try:
            compile(opts.config.read_text(), str(opts.config), "exec")
        except SyntaxError as err:
            raise UserError(f"--config {opts.config}: line {err.lineno}: {err.msg}") from None
    try:
        cfg = mmcv.Config.fromfile(str(opts.config))
    except Exception as err:  # mmcv reports syntax errors, bad _base_ and bad imports with many types
        raise UserError(f"--config {opts.config}: cannot be loaded: {err}") from None
    if opts.cfg_options:
        cfg.merge_from_dict(opts.cfg_options)
    for key in ("model", "data"):
        if key not in cfg:
            raise UserError(f"--config {opts.config}: has no {key!r} section")
    return cfg


def _in_repo(path: Path) -> Path:
    """A default file, relative to the working directory when run from the repository root."""
    return path if path.is_file() else REPO / path


def _with_defaults(opts: RunOptions, cfg: mmcv.Config) -> RunOptions:
    """Options left unset take the mmdet config's ``ahcq_defaults`` (``q_config``, ``quant_encoder``), so a
    config that is the demo runs as the demo however it is named on the command line."""
    defaults = dict(cfg.get("ahcq_defaults") or {})
    unknown = sorted(set(defaults) - {"q_config", "quant_encoder"})
    if unknown:
        raise UserError(f"--config {opts.config}: ahcq_defaults: unknown key {unknown[0]!r}; allowed: "
                        f"q_config, quant_encoder")
    q_config = opts.q_config or _in_repo(Path(defaults.get("q_config", DEFAULT_QCONFIG)))
    quant_encoder = opts.quant_encoder if opts.quant_encoder is not None else bool(
        defaults.get("quant_encoder", False))
    out = opts.out or Path("runs") / f"{opts.config.stem}__{q_config.stem}"
    return dataclasses.replace(opts, q_config=q_config, quant_encoder=quant_encoder, out=out)


def _load_qconfig(opts: RunOptions) -> QConfig:
    try:
        qconfig = load_qconfig(opts.q_config)
    except ConfigError as err:
        raise UserError(f"--q_config: {err}") from None
    if opts.seed is not None:
        qconfig = dataclasses.replace(qconfig, seed=opts.seed)
    if opts.recon_iters is not None:
        recon = dataclasses.replace(qconfig.recon, iters=opts.recon_iters, iters_cams=opts.recon_iters)
        qconfig = dataclasses.replace(qconfig, recon=recon)
    return qconfig


def _build_model(cfg: mmcv.Config, config_path: Path, device: torch.device) -> Any:
    try:
        model = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    except Exception as err:  # noqa: BLE001 - mmcv's builders wrap any failure of the built type
        # mmcv's builders prefix the failing type's name: a wrong checkpoint, a bad or unknown config key
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        text = text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ..."
        raise UserError(f"model of {config_path} could not be built: {text}") from None
    return model.to(device).eval()


def calibration_choice(qconfig: QConfig, population: int, calib_images: int | None = None) -> list[int]:
    """Indices of the calibration images: ``calib_images`` (else ``calibrate``) of ``population``, drawn
    with the config's seed."""
    n = min(calib_images or qconfig.calibrate, population)
    return calibration_indices(qconfig.seed, population, n) if n else []


class _Timer:
    """Stage wall-clock times in seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._start, 3)
        self._start = now


def _cache_split(cache: FeatureCache, model: Any, dataset: Any, indices: Sequence[int],
                 split: str, ranks: Ranks) -> tuple[list[str], CacheStats]:
    """Cache keys of ``indices`` (prepared where missing, each rank its share); the counts of all ranks."""
    stats = CacheStats()
    mine = ranks.shard(list(indices))
    bar = functools.partial(progress_bar, total=len(mine), desc=f"prepare {split}", unit="img")
    parts = ranks.all_gather((cache.prepare(model, pipeline_items(dataset, mine), stats, bar), stats))
    keys = ranks.unshard([k for k, _ in parts])
    stats = CacheStats(sum(s.hits for _, s in parts), sum(s.misses for _, s in parts))
    if stats.misses == 0:
        logger.info("cache hit: %d %s images from %s", stats.hits, split, cache.dir)
    else:
        logger.info("cache miss: prepared %d of %d %s images into %s", stats.misses, len(keys), split,
                    cache.dir)
    return keys, stats


def _cached_embeddings(model: Any, opts: RunOptions) -> bool:
    """Whether float image embeddings come from the cache: SAM with a float encoder (SAM2's multi-level
    features are recomputed)."""
    return not opts.quant_encoder and not is_sam2(model.sam)


def _quantize(model: Any, cache: FeatureCache, calib_keys: Sequence[str], qconfig: QConfig,
              opts: RunOptions, device: torch.device, staging: Path, ranks: Ranks) -> dict[str, Any]:
    """The PTQ recipe: calibration alike on every rank (each on all calibration images), reconstruction
    data-parallel over them; each rank resumes from its own reconstruction state."""
    sam = model.sam
    samples = []
    for key in calib_keys:
        cached = cache.load(sam, key)
        embedding = cache.embedding(sam, cached) if _cached_embeddings(model, opts) else None
        samples.append(CalibSample(cached, embedding))
    if len(samples) < ranks.world:
        raise UserError(f"{len(samples)} calibration images cannot be shared by {ranks.world} ranks")
    ptq = image_ptq(sam, quant_encoder=opts.quant_encoder, box_chunk=model.box_chunk,
                    max_boxes=opts.calib_max_boxes, device=device, exportable=opts.backend == "onnxruntime",
                    ranks=ranks)
    state = "recon_state" if ranks.main else f"recon_state_rank{ranks.rank}"
    return run_ptq(ptq, samples, qconfig, staging / state)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(cfg: mmcv.Config, opts: RunOptions, qconfig: QConfig, model: Any, device: torch.device,
              calib_indices: list[int], ranks: Ranks) -> dict[str, Any]:
    """Everything that decides this run's results (see ``run_identity``)."""
    splits = {split: cfg.data.get(split) for split in ("test", "calib", "train") if split in cfg.data}
    data = {split: {"ann": _file_digest(s["ann_file"]), "img_prefix": s.get("img_prefix")}
            for split, s in splits.items() if isinstance(s, dict) and s.get("ann_file")}
    return {
        "mmdet_config": digest(json.loads(json.dumps(dict(cfg.items()), default=str))),
        "sam_weights": weights_digest(model.sam),
        "prompt": digest({"config": dict(cfg.model.get("prompt") or {}),
                          "weights": weights_digest(model.prompt)}),
        "data": digest({"splits": data, "limit": opts.limit}),
        "qconfig": digest({**qconfig.to_dict(), **qconfig.derived()}) if not opts.fp_only else None,
        "calibration": {"indices": calib_indices, "max_boxes": opts.calib_max_boxes},
        "quant_encoder": opts.quant_encoder,
        "evaluations": "fp" if opts.fp_only else "quant" if opts.skip_fp else "fp+quant",
        "seed": qconfig.seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "code": code_version(),
        **({"pack": True} if opts.pack else {}),
        **({"backend": opts.backend} if opts.backend != "torch" else {}),
        **({"ranks": ranks.world} if ranks.world > 1 else {}),
    }


def _prepare(opts: RunOptions) -> tuple[RunOptions, mmcv.Config, QConfig]:
    """Options, config and qconfig, with every cheap input check done."""
    check_folder(opts.out, "--out")
    check_folder(opts.cache_dir, "--cache-dir")
    cfg = _load_config(opts)
    opts = _with_defaults(opts, cfg)
    check_folder(opts.out, "--out")
    qconfig = _load_qconfig(opts)
    check_config_files(cfg, opts.config)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: no CUDA device is available")
    if opts.pack and opts.fp_only:
        raise UserError("--pack: --fp-only quantizes nothing to pack")
    if opts.backend not in BACKENDS:
        raise UserError(f"--backend {opts.backend}: choose one of {', '.join(BACKENDS)}")
    if opts.backend == "onnxruntime" and opts.fp_only:
        raise UserError("--backend onnxruntime: --fp-only quantizes nothing to export")
    if opts.backend == "onnxruntime" and opts.device != "cpu":
        raise UserError("--backend onnxruntime: the exported graphs run on ONNX Runtime's CPU provider; "
                        "use --device cpu")
    return opts, cfg, qconfig


def _check_sam2_options(opts: RunOptions, qconfig: QConfig) -> None:
    """What the SAM2 image path does not have, refused before any work."""
    if opts.pack:
        raise UserError("--pack: the packed format holds SAM (segment_anything) models only, not SAM2")
    if opts.backend != "torch":
        raise UserError(f"--backend {opts.backend}: the ONNX export covers SAM (segment_anything) only, not "
                        "SAM2; use --backend torch")
    if qconfig.pcc.enabled and not opts.fp_only:
        raise UserError(f"--q_config {opts.q_config}: pcc.enabled: SAQ-SAM's PCC is defined on SAM's decoder "
                        "attentions only, not on SAM2; set pcc.enabled: false")


def run(opts: RunOptions) -> dict[str, Any]:
    """Do the run described by ``opts``; returns what it wrote to ``results.json`` in ``--out``."""
    try:
        return _run(opts)
    except (RunInputError, RunMismatch, NonFiniteOutput) as err:
        raise UserError(str(err)) from None


def _run(opts: RunOptions) -> dict[str, Any]:
    timer = _Timer()
    opts, cfg, qconfig = _prepare(opts)
    ranks = init_ranks(opts.device)
    if ranks.world > 1 and (opts.pack or opts.backend != "torch"):
        raise UserError("--pack and --backend onnxruntime run in one process; start them without torchrun")
    device = torch.device(opts.device)
    seed_everything(qconfig.seed)
    model = _build_model(cfg, opts.config, device)
    try:
        prepare_weights(model.sam, None if opts.fp_only else qconfig)
    except ValueError as err:
        raise UserError(f"--q_config {opts.q_config}: {err}") from None
    sam_ckpt = (cfg.model.get("sam") or {}).get("checkpoint") or "the SAM weights"
    check_finite_weights(model.sam, f"SAM checkpoint {sam_ckpt}")
    check_finite_weights(model.prompt, "prompt source weights")
    if is_sam2(model.sam):
        _check_sam2_options(opts, qconfig)
    eval_set = build_split(cfg.data.test, opts.limit)
    if len(eval_set) == 0:
        raise UserError(f"data.test of {opts.config} has no images to evaluate")
    check_annotations(eval_set, "test")
    check_image_files(eval_set, "test")
    split = "calib" if "calib" in cfg.data else "train"
    calib_set = build_split(cfg.data.get("calib", cfg.data.train), filter_empty=True)
    if not opts.fp_only:
        if len(calib_set) == 0:
            raise UserError(f"data.{split} has no image with annotations to calibrate on")
        check_image_files(calib_set, split)
    calib_indices = calibration_choice(qconfig, len(calib_set), opts.calib_images) if not opts.fp_only else []
    identity = _identity(cfg, opts, qconfig, model, device, calib_indices, ranks)
    folder = RunFolder(opts.out, identity, opts.overwrite)
    finished, staging, resumed = ranks.broadcast(_open(folder, opts) if ranks.main else None)
    if finished is not None:
        return finished
    if resumed:
        logger.info("resuming the interrupted run kept in %s", staging)
    timer.stage("build")
    try:
        results = _work(opts, cfg, qconfig, model, device, eval_set, calib_set, calib_indices, staging, timer,
                        ranks)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; run the same command again to resume (state kept in {staging})") \
            from None
    results.update(identity=identity, overrides={"recon_iters": opts.recon_iters})
    if ranks.main:
        write_json(staging / "results.json", results)
        folder.commit(staging, keep=("recon_state",) if opts.keep_state else ())
        print(format_table(results))
    return results


def _open(folder: RunFolder, opts: RunOptions) -> tuple[dict[str, Any] | None, Path | None, bool]:
    """(results of the identical finished run in ``--out``, or None; else the staging folder and whether it
    resumes an interrupted run)."""
    finished = folder.finished()
    if finished is not None:
        logger.info("%s already holds this run (same fingerprint); nothing to do (--overwrite reruns it)",
                    opts.out)
        print(format_table(finished))
        return finished, None, False
    return (None, *folder.open())


def _work(opts: RunOptions, cfg: mmcv.Config, qconfig: QConfig, model: Any, device: torch.device,
          eval_set: Any, calib_set: Any, calib_indices: list[int], staging: Path,
          timer: _Timer, ranks: Ranks) -> dict[str, Any]:
    """Cache, evaluate and quantize in ``staging``; float results of an interrupted run are reused."""
    config_blob = json.dumps(dict(cfg.items()), sort_keys=True, default=str)
    cache = FeatureCache(opts.cache_dir, run_key(json.loads(config_blob), module_fingerprint(model.prompt)),
                         module_fingerprint(model.sam.image_encoder))
    calib_keys, calib_stats = [], CacheStats()
    if not opts.fp_only:
        calib_keys, calib_stats = _cache_split(cache, model, calib_set, calib_indices, "calibration", ranks)
    eval_keys, eval_stats = _cache_split(cache, model, eval_set, range(len(eval_set)), "evaluation", ranks)
    timer.stage("cache")

    progress = _read_progress(staging)
    results: dict[str, Any] = {}
    if not opts.skip_fp:
        if "fp" in progress:
            results["fp"] = progress["fp"]
            logger.info("float evaluation: kept from the interrupted run")
        else:
            results["fp"] = evaluate(model, eval_set, cache, eval_keys, staging, "fp",
                                     _cached_embeddings(model, opts), ranks)
            if ranks.main:
                write_json(staging / PROGRESS, {"fp": results["fp"]})
        timer.stage("fp_eval")
    if not opts.fp_only:
        results["calibration"] = _quantize(model, cache, calib_keys, qconfig, opts, device, staging, ranks)
        digests = ranks.all_gather(weights_digest(model.sam))
        if len(set(digests)) > 1:
            raise RuntimeError(f"the ranks hold different quantized models after calibration and "
                               f"reconstruction (digests {sorted(set(digests))}); results would mix them")
        timer.stage("quantize")
        results["quant"] = evaluate(model, eval_set, cache, eval_keys, staging, "quant",
                                    _cached_embeddings(model, opts), ranks)
        timer.stage("quant_eval")
        if opts.pack:
            sizes = pack_model(model.sam, qconfig, bool(opts.quant_encoder), staging / PACKED_FILE)
            results["packed"] = {"file": PACKED_FILE, **sizes}
            timer.stage("pack")
        if opts.backend == "onnxruntime":
            results["onnxruntime"], results["onnx"] = _evaluate_onnxruntime(model, opts, eval_set, cache,
                                                                            eval_keys, staging)
            timer.stage("onnxruntime")
    results.update(
        config={"path": str(opts.config), "text_sha256": hashlib.sha256(cfg.text.encode()).hexdigest(),
                "resolved_sha256": hashlib.sha256(config_blob.encode()).hexdigest(),
                "cfg_options": opts.cfg_options},
        qconfig={"path": str(opts.q_config), **qconfig.to_dict(), **qconfig.derived()},
        quant_encoder=opts.quant_encoder,
        seed=qconfig.seed,
        device=str(device),
        boxes={"box_chunk": model.box_chunk, "calib_max_boxes": opts.calib_max_boxes},
        images={"eval": len(eval_keys), "calib": len(calib_keys), "calib_indices": calib_indices},
        cache={"dir": str(cache.dir), "calib": calib_stats.status, "eval": eval_stats.status,
               "prepared": calib_stats.misses + eval_stats.misses},
        timings_s=timer.times,
        versions={"ahcq": ahcq.__version__, "torch": torch.__version__, "mmdet": mmdet.__version__,
                  "mmcv": mmcv.__version__, "python": platform.python_version(),
                  "torch_threads": torch.get_num_threads()},
    )
    results["timings_s"]["total"] = round(sum(timer.times.values()), 3)
    return results


def _evaluate_onnxruntime(model: Any, opts: RunOptions, eval_set: Any, cache: FeatureCache,
                          eval_keys: Sequence[str], staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export the quantized SAM to ONNX in ``staging`` and evaluate it in ONNX Runtime: (metrics, what
    the files are: size and quantization operators of each)."""
    import onnxruntime

    try:
        files = export_onnx(model.sam, staging / ONNX_DIR, bool(opts.quant_encoder))
    except OnnxExportError as err:
        raise UserError(f"--backend onnxruntime: {err}") from None
    with running_in_onnxruntime(model.sam, files, torch.get_num_threads()):
        metrics = evaluate(model, eval_set, cache, eval_keys, staging, "onnxruntime", not opts.quant_encoder)
    described = {part: {"file": f"{ONNX_DIR}/{path.name}", "bytes": path.stat().st_size,
                        "ops": graph_ops(path)} for part, path in files.items()}
    return metrics, {"files": described, "opset": OPSET, "onnxruntime": onnxruntime.__version__,
                     "provider": "CPUExecutionProvider"}


def _read_progress(staging: Path) -> dict[str, Any]:
    try:
        data = json.loads((staging / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and (staging / "fp.segm.json").is_file() else {}
