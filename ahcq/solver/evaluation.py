"""COCO evaluation of the SAM wrapper from cached samples, through mmdet's own ``CocoDataset.evaluate``.

Masks are scored by pycocotools via mmdet exactly as the reference pipeline scores them (segm and bbox AP,
maxDets 100); only the inputs differ: boxes and encoder inputs come from the feature cache, so the
detector never runs here. The per-detection COCO result files are kept next to ``results.json``
(``<tag>.segm.json``, ``<tag>.bbox.json``) so that runs can be compared mask by mask.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmdet.core import encode_mask_results
from mmdet.datasets import build_dataset

from ahcq.progress import progress_bar
from ahcq.solver.feature_cache import FeatureCache
from ahcq.solver.noise import without_noise
from ahcq.solver.ranks import SINGLE, Ranks

__all__ = ["METRIC_KEYS", "NonFiniteOutput", "build_split", "evaluate", "pipeline_items"]

logger = logging.getLogger(__name__)
METRIC_KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


class NonFiniteOutput(ValueError):
    """The model predicted a NaN or infinite box or score; nothing is written for it (NaN is not JSON)."""


def build_split(data_cfg: Any, limit: int | None = None, filter_empty: bool = False) -> Any:
    """An mmdet dataset of one config split; ``limit`` keeps its first images (also for evaluation).

    ``filter_empty`` applies mmdet's training-set filter (images without annotations or under 32 px are
    dropped), as the references did for the calibration images.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        dataset = build_dataset(dict(data_cfg, test_mode=not filter_empty))
    _renumber_annotation_id_zero(dataset)
    if limit is not None:
        dataset.data_infos = dataset.data_infos[:limit]
        dataset.img_ids = dataset.img_ids[:limit]
    return dataset


def _renumber_annotation_id_zero(dataset: Any) -> None:
    """Shift every annotation id up by one when some annotation has id 0.

    COCOeval records a match as the matched annotation's id, so id 0 reads as "unmatched": a detection
    matching that ground truth would count as a false positive and the ground truth as missed. Nothing
    downstream refers to annotation ids (results name images and categories), so the shift is safe.
    """
    coco = getattr(dataset, "coco", None)
    if coco is None or 0 not in coco.anns:
        return
    logger.warning("%s: annotation id 0 found; annotation ids are shifted by one for COCOeval",
                   getattr(dataset, "ann_file", "dataset"))
    for ann in coco.dataset["annotations"]:
        ann["id"] += 1
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()


def pipeline_items(dataset: Any, indices: Sequence[int]) -> Iterator[tuple[torch.Tensor, dict]]:
    """``(img (3, H, W), img_meta)`` of each index, loaded through the dataset's test pipeline."""
    for i in indices:
        data = dataset.prepare_test_img(i)
        yield data["img"][0], data["img_metas"][0].data


def _run(model: Any, cache: FeatureCache, keys: Sequence[str], cached_embeddings: bool, tag: str) -> list:
    results = []
    for key in progress_bar(keys, desc=f"evaluate {tag}", unit="img"):
        cached = cache.load(model.sam, key)
        embedding = cache.embedding(model.sam, cached) if cached_embeddings else None
        bbox_results, segm_results = model.predict_cached(cached.sample, embedding)
        if not all(np.isfinite(r).all() for r in bbox_results):
            raise NonFiniteOutput(f"{tag} evaluation: the model predicted NaN/Inf boxes or scores on "
                                  f"{cached.filename}")
        results.append((bbox_results, encode_mask_results(segm_results)))
    return results


def evaluate(
    model: Any,
    dataset: Any,
    cache: FeatureCache,
    keys: Sequence[str],
    out_dir: str | os.PathLike,
    tag: str,
    cached_embeddings: bool = False,
    ranks: Ranks = SINGLE,
) -> dict[str, float | None]:
    """``{"segm_mAP": .., "segm_mAP_50": .., "bbox_mAP": .., ...}`` (COCO AP x 100, mmdet's key names).

    mmdet rounds AP to three decimals, so the values carry one decimal after scaling.

    ``keys[i]`` must be image ``i`` of ``dataset``. ``cached_embeddings``: read the float image
    embeddings from the cache (only valid while the encoder is float). With several ``ranks`` each predicts
    its share of the images; rank 0 scores them all, writes the result files, and every rank gets the metrics.
    """
    if len(keys) != len(dataset):
        raise ValueError(f"evaluate: {len(keys)} cached images for a dataset of {len(dataset)}")
    model.eval()
    results = ranks.unshard(ranks.all_gather(_run(model, cache, ranks.shard(keys), cached_embeddings, tag)))
    if not ranks.main:
        return ranks.broadcast(None)
    return ranks.broadcast(_score(dataset, results, Path(out_dir), tag))


def _score(dataset: Any, results: list, out_dir: Path, tag: str) -> dict[str, float | None]:
    """COCO metrics of ``results`` (one entry per image of ``dataset``), result files in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{tag}.") as tmp:
        with contextlib.redirect_stdout(io.StringIO()), without_noise():  # pycocotools prints its progress
            raw = dataset.evaluate(
                results, metric=["bbox", "segm"], logger="silent", jsonfile_prefix=os.path.join(tmp, tag)
            )
        for kind in ("bbox", "segm"):
            produced = Path(tmp) / f"{tag}.{kind}.json"
            if produced.is_file():
                os.replace(produced, out_dir / produced.name)
    metrics: dict[str, float | None] = {}
    for kind in ("segm", "bbox"):
        if f"{kind}_mAP" not in raw:
            logger.warning("%s: no %s detections at all; its AP is recorded as null", tag, kind)
        for k in METRIC_KEYS:
            value = raw.get(f"{kind}_{k}")
            metrics[f"{kind}_{k}"] = None if value is None else round(100.0 * float(value), 4)
    return metrics
