"""One PTQ recipe for every model: quantize -> calibrate (BIG, statistics, ACNR, recalibration, weight
groups) -> PCC -> reconstruct -> evaluation state.

A model family supplies a ``PTQModel``: how to quantize it, one calibration forward, its BIG sites, its PCC
and its reconstruction. The image CLI (SAM) and the video CLI (SAM2) run the same ``run_ptq``.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ahcq.quantization.api import iter_quantizers
from ahcq.quantization.config import QConfig
from ahcq.solver.calibration import calibrate, switch_to_evaluation

__all__ = ["PTQModel", "run_ptq"]


@dataclass
class PTQModel:
    """What the recipe needs of a model family.

    ``quantize(qconfig)`` builds every quantizer (OFF); ``forward(sample)`` runs one calibration sample;
    ``big_sites()`` lists the attentions BIG tests (after ``quantize``), decided on the first
    ``big_samples`` samples; ``pcc(samples, qconfig)`` is SAQ-SAM's clipping search (``None``: the family has
    none); ``reconstruct(samples, qconfig, state_dir)`` reconstructs and reports.
    """

    model: nn.Module
    quantize: Callable[[QConfig], Any]
    forward: Callable[[Any], None]
    big_sites: Callable[[], Sequence[tuple[str, nn.Module]]]
    big_samples: int
    reconstruct: Callable[[Sequence[Any], QConfig, Path | None], dict[str, Any]]
    pcc: Callable[[Sequence[Any], QConfig], dict[str, Any]] | None = None


def run_ptq(ptq: PTQModel, samples: Sequence[Any], qconfig: QConfig, state_dir: Path | None = None,
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Quantize, calibrate, clip, reconstruct as ``qconfig`` asks and leave the model in its evaluation
    state; the report of every step (``timings`` gets ``calibration`` and ``reconstruction`` seconds)."""
    start = time.perf_counter()
    ptq.quantize(qconfig)
    report = calibrate(ptq.model, samples, ptq.forward, qconfig, ptq.big_sites(), ptq.big_samples)
    pcc = {}
    if qconfig.pcc.enabled:
        if ptq.pcc is None:
            raise ValueError("pcc.enabled: this model has no PCC sites (SAM's decoder attentions only)")
        pcc = ptq.pcc(samples, qconfig)
    calibrated = time.perf_counter()
    recon: dict[str, Any] = {"requested": False, "ran": False}
    if qconfig.recon.enabled:
        recon = {"requested": True, "ran": True, "report": ptq.reconstruct(samples, qconfig, state_dir)}
    switch_to_evaluation(ptq.model)
    if timings is not None:
        timings["calibration"] = round(calibrated - start, 3)
        timings["reconstruction"] = round(time.perf_counter() - calibrated, 3)
    return {**dataclasses.asdict(report), "pcc": pcc, "reconstruction": recon,
            "quantizers": sum(1 for _ in iter_quantizers(ptq.model))}
