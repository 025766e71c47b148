"""One PTQ run of SAM on COCO: build -> cache prompts and encoder inputs -> float eval -> quantize,
calibrate, (reconstruct) -> quantized eval -> ``results.json``.

Everything the user can get wrong (config, qconfig, checkpoints, annotation files, device) is checked
before any output is written and raised as :class:`UserError`, which the CLI prints without a traceback.

When ``recon.enabled`` the run reconstructs with :func:`ahcq.solver.recon_sam.reconstruct_sam` (its
per-unit state under ``--out``/recon_state lets an interrupted run resume) and stores the report under
``calibration.reconstruction.report``; without reconstruction AdaRound weights are rounded to nearest.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
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
from tqdm.auto import tqdm

import ahcq
from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization.api import iter_quantizers
from ahcq.quantization.config import ConfigError, QConfig, load_qconfig
from ahcq.solver.calibration import calibrate, switch_to_evaluation
from ahcq.solver.evaluation import build_split, evaluate, pipeline_items
from ahcq.solver.feature_cache import CachedImage, CacheStats, FeatureCache, module_fingerprint, run_key
from ahcq.solver.pcc_sam import apply_pcc
from ahcq.solver.recon_sam import reconstruct_sam
from ahcq.solver.results import format_table, write_results
from ahcq.solver.seeding import calibration_indices, seed_everything
from projects.instance_segment_anything.sam_runner import decode_boxes

__all__ = ["CalibSample", "RunOptions", "UserError", "calibration_choice", "pcc_step", "reconstruct_step",
           "run"]

logger = logging.getLogger(__name__)
TINY_SAM_HINT = "make it with: python tools/make_demo_data.py && python tools/train_tiny_sam.py --out {ckpt}"
DEMO_DATA_HINT = "generate the demo set with: python tools/make_demo_data.py"
MAX_MESSAGE = 600


class UserError(Exception):
    """Bad input from the user (missing file, bad config or option); reported without a traceback."""


@dataclass
class RunOptions:
    """Everything a run depends on (the CLI's arguments, resolved)."""

    config: Path
    q_config: Path
    out: Path
    cache_dir: Path
    quant_encoder: bool = False
    seed: int | None = None
    device: str = "cpu"
    calib_images: int | None = None
    calib_max_boxes: int = 32
    limit: int | None = None
    fp_only: bool = False
    skip_fp: bool = False
    cfg_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibSample:
    """A calibration image: cached encoder input and boxes (and float embedding when the encoder is float)."""

    cached: CachedImage
    embedding: torch.Tensor | None


def sam_forward(sam: Any, sample: CalibSample, box_chunk: int, max_boxes: int) -> None:
    """Run ``sam`` (encoder unless its float embedding is given, then decoder over the boxes) on a sample."""
    image = sample.cached.sample.image
    with torch.no_grad():
        embedding = sam.image_encoder(image.tensor) if sample.embedding is None else sample.embedding
    decode_boxes(sam, embedding, image, sample.cached.sample.prompts.boxes[:max_boxes], box_chunk)


def _load_config(opts: RunOptions) -> mmcv.Config:
    if not opts.config.is_file():
        raise UserError(f"--config: no such mmdet config {str(opts.config)!r}")
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


def _check_inputs(cfg: mmcv.Config, opts: RunOptions) -> None:
    """Name the missing checkpoint or annotation file, with the command that makes the demo ones."""
    sam = cfg.model.get("sam")
    ckpt = sam.get("checkpoint") if isinstance(sam, dict) else None
    if ckpt is not None and not os.path.isfile(ckpt):
        hint = TINY_SAM_HINT.format(ckpt=ckpt) if sam.get("type") == "TinySAM" else "see ckpt/README.md"
        raise UserError(f"SAM checkpoint not found: {ckpt!r} (model.sam.checkpoint of {opts.config}); {hint}")
    for split in ("test", "calib" if "calib" in cfg.data else "train"):
        ann = cfg.data.get(split, {}).get("ann_file")
        if ann is None:
            raise UserError(f"--config {opts.config}: data.{split}.ann_file is not set")
        if not os.path.isfile(ann):
            hint = f"; {DEMO_DATA_HINT}" if "demo_root" in cfg else ""
            raise UserError(f"annotations not found: {ann!r} (data.{split}.ann_file){hint}")


def _load_qconfig(opts: RunOptions) -> QConfig:
    try:
        qconfig = load_qconfig(opts.q_config)
    except ConfigError as err:
        raise UserError(f"--q_config: {err}") from None
    return qconfig if opts.seed is None else dataclasses.replace(qconfig, seed=opts.seed)


def _build_model(cfg: mmcv.Config, config_path: Path, device: torch.device) -> Any:
    importlib.import_module("projects.instance_segment_anything")
    try:
        model = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    except (FileNotFoundError, KeyError, TypeError, ValueError, RuntimeError) as err:
        # mmcv's builders prefix the failing type's name: a wrong checkpoint, a bad or unknown config key
        text = str(err)
        text = text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ..."
        raise UserError(f"model of {config_path} could not be built: {text}") from None
    return model.to(device).eval()


def calibration_choice(qconfig: QConfig, population: int, calib_images: int | None = None) -> list[int]:
    """Indices of the calibration images: ``calib_images`` (else ``calibrate``) of ``population``, drawn
    with the config's seed."""
    n = min(calib_images or qconfig.calibrate, population)
    return calibration_indices(qconfig.seed, population, n) if n else []


def pcc_step(sam: Any, samples: Sequence[CalibSample], qconfig: QConfig,
             device: torch.device) -> dict[str, Any]:
    """SAQ-SAM's clipping search when ``pcc.enabled``; its report (empty when off)."""
    return apply_pcc(sam, samples, qconfig, device) if qconfig.pcc.enabled else {}


def reconstruct_step(sam: Any, samples: Sequence[CalibSample], qconfig: QConfig, device: torch.device,
                     state_dir: Path | None = None, max_boxes: int | None = None) -> dict[str, Any]:
    """Block reconstruction when ``recon.enabled``; its per-unit state under ``state_dir`` lets an
    interrupted run resume, ``max_boxes`` caps the boxes per image."""
    if not qconfig.recon.enabled:
        return {"requested": False, "ran": False}
    report = reconstruct_sam(sam, samples, qconfig, device=device, state_dir=state_dir, max_boxes=max_boxes)
    return {"requested": True, "ran": True, "report": report}


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
                 split: str) -> tuple[list[str], CacheStats]:
    stats = CacheStats()
    progress = functools.partial(tqdm, total=len(indices), desc=f"prepare {split}", unit="img")
    keys = cache.prepare(model, pipeline_items(dataset, indices), stats, progress)
    if stats.misses == 0:
        logger.info("cache hit: %d %s images from %s", stats.hits, split, cache.dir)
    else:
        logger.info("cache miss: prepared %d of %d %s images into %s", stats.misses, len(keys), split,
                    cache.dir)
    return keys, stats


def _quantize(model: Any, cache: FeatureCache, calib_keys: Sequence[str], qconfig: QConfig,
              opts: RunOptions, device: torch.device) -> dict[str, Any]:
    sam = model.sam
    samples = []
    for key in calib_keys:
        cached = cache.load(sam, key)
        samples.append(CalibSample(cached, None if opts.quant_encoder else cache.embedding(sam, cached)))
    quantize_sam(sam, qconfig, quant_encoder=opts.quant_encoder)
    forward = functools.partial(sam_forward, sam, box_chunk=model.box_chunk, max_boxes=opts.calib_max_boxes)
    report = calibrate(sam, samples, forward, qconfig)
    pcc = pcc_step(sam, samples, qconfig, device)
    recon = reconstruct_step(sam, samples, qconfig, device, opts.out / "recon_state", opts.calib_max_boxes)
    switch_to_evaluation(sam)
    return {**dataclasses.asdict(report), "pcc": pcc, "reconstruction": recon,
            "quantizers": sum(1 for _ in iter_quantizers(sam))}


def run(opts: RunOptions) -> dict[str, Any]:
    """Do the run described by ``opts``; returns what it wrote to ``opts.out/results.json``."""
    timer = _Timer()
    cfg = _load_config(opts)
    qconfig = _load_qconfig(opts)
    _check_inputs(cfg, opts)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: no CUDA device is available")
    device = torch.device(opts.device)
    seed_everything(qconfig.seed)
    model = _build_model(cfg, opts.config, device)
    eval_set = build_split(cfg.data.test, opts.limit)
    if len(eval_set) == 0:
        raise UserError(f"data.test of {opts.config} has no images to evaluate")
    calib_set = build_split(cfg.data.get("calib", cfg.data.train), filter_empty=True)
    if not opts.fp_only and len(calib_set) == 0:
        split = "calib" if "calib" in cfg.data else "train"
        raise UserError(f"data.{split} has no image with annotations to calibrate on")
    calib_indices = calibration_choice(qconfig, len(calib_set), opts.calib_images)
    timer.stage("build")

    config_blob = json.dumps(dict(cfg.items()), sort_keys=True, default=str)
    cache = FeatureCache(opts.cache_dir, run_key(json.loads(config_blob), module_fingerprint(model.prompt)),
                         module_fingerprint(model.sam.image_encoder))
    calib_keys, calib_stats = [], CacheStats()
    if not opts.fp_only:
        calib_keys, calib_stats = _cache_split(cache, model, calib_set, calib_indices, "calibration")
    eval_keys, eval_stats = _cache_split(cache, model, eval_set, range(len(eval_set)), "evaluation")
    timer.stage("cache")

    results: dict[str, Any] = {}
    if not opts.skip_fp:
        results["fp"] = evaluate(model, eval_set, cache, eval_keys, opts.out, "fp", not opts.quant_encoder)
        timer.stage("fp_eval")
    if not opts.fp_only:
        results["calibration"] = _quantize(model, cache, calib_keys, qconfig, opts, device)
        timer.stage("quantize")
        results["quant"] = evaluate(model, eval_set, cache, eval_keys, opts.out, "quant",
                                    not opts.quant_encoder)
        timer.stage("quant_eval")
    results.update(
        config={"path": str(opts.config), "text_sha256": hashlib.sha256(cfg.text.encode()).hexdigest(),
                "resolved_sha256": hashlib.sha256(config_blob.encode()).hexdigest(),
                "cfg_options": opts.cfg_options},
        qconfig={"path": str(opts.q_config), **qconfig.to_dict()},
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
    write_results(opts.out, results)
    print(format_table(results))
    return results
