"""Calibration of a quantized SAM on cached calibration samples: BIG, statistics, ACNR, recalibration;
then ``switch_to_evaluation``.

Order (each step on float activations, so no step sees another's rounding):

1. BIG (``ptq4sam.BIG``): with every quantizer off, pool the key-projection outputs of each token->image
   attention over the first ``BIG_IMAGES`` calibration images (all their boxes; the KDE sees a random
   ``BIG_SAMPLE_POINTS`` values per decoder call); where it finds two peaks, fold the per-channel sign of
   the mean key into ``q_proj``/``k_proj`` (scores unchanged). The references decided on one box of
   one image.
2. Statistics: every quantizer observes all calibration images (weights their first batch).
3. ACNR (``acnr.enabled``, AHCQ-SAM): per quantized Linear, the input-quantization error
   ``dX = X - Q(X)`` of the float model is summarised by its second moment ``E[dX^T dX]`` (bounded memory
   whatever the token count) and the weight is conditioned against it; then every quantizer is
   calibrated again, since the conditioned weights change the activations downstream and the weights
   themselves.
4. Weight grouping (``cag.apply_to_weights``, AHCPTQ supplement Tab. 6): every per-channel weight grid of a
   quantized Linear/Conv is replaced by at most ``cag.weight_groups`` shared grids, after the last pass
   computed the grids and before reconstruction learns the rounding on them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ahcq.models.sam_roles import big_sites
from ahcq.quantization.api import (
    assert_fully_quantized,
    calibrating,
    iter_quantizers,
    quantization_disabled,
    set_mode,
)
from ahcq.quantization.config import ACNRConfig, QConfig
from ahcq.quantization.layers import QuantConv2d, QuantLinear
from ahcq.quantization.quantizers import AdaRoundQuantizer, CAGQuantizer, Mode
from ahcq.quantization.quantizers.weight_groups import group_weight_grid
from ahcq.quantization.transforms import apply_acnr_, fold_sign, is_bimodal

__all__ = [
    "BIG_IMAGES", "CalibrationReport", "apply_big", "calibrate", "condition_linears", "group_weights",
    "switch_to_evaluation",
]

logger = logging.getLogger(__name__)
BIG_IMAGES = 4
BIG_SAMPLE_POINTS = 20000
Forward = Callable[[Any], None]


@dataclass
class CalibrationReport:
    """What calibration decided: BIG folds per attention, ACNR condition numbers per Linear and weight
    groups per layer."""

    images: int = 0
    big: dict[str, bool] = field(default_factory=dict)
    acnr: dict[str, dict[str, float | bool]] = field(default_factory=dict)
    passes: int = 0
    weight_groups: dict[str, int] = field(default_factory=dict)


def _pass(model: nn.Module, samples: Sequence[Any], forward: Forward, desc: str) -> None:
    with torch.no_grad():
        for sample in tqdm(samples, desc=desc, unit="img"):
            forward(sample)


class _KeyStats:
    """Channel sums of an attention's key projection (for the signs) and a bounded random sample of its
    values (for the KDE), so memory does not grow with boxes x tokens."""

    def __init__(self, generator: torch.Generator) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.sample: list[torch.Tensor] = []
        self.generator = generator

    def __call__(self, _module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        flat = out.detach().reshape(-1, out.shape[-1])
        total = flat.double().sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.rows += len(flat)
        values = flat.reshape(-1)
        picks = torch.randint(len(values), (min(BIG_SAMPLE_POINTS, len(values)),), generator=self.generator)
        self.sample.append(values[picks.to(values.device)].cpu())


@torch.no_grad()
def apply_big(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, qconfig: QConfig,
    sites: Sequence[tuple[str, nn.Module]] | None = None,
) -> dict[str, bool]:
    """Fold BIG signs where the pooled key activations are bimodal; ``{attention: folded}``.

    ``sites`` are the ``(name, attention)`` pairs to test, each with ``q_proj``/``k_proj`` Linears
    (default: SAM's ``big_sites``; SAM2 passes its own). Keys are pooled over ``samples[:BIG_IMAGES]``.
    """
    sites = big_sites(sam) if sites is None else sites
    generator = torch.Generator().manual_seed(qconfig.seed)
    stats = {name: _KeyStats(generator) for name, _ in sites}
    hooks = [attn.k_proj.register_forward_hook(stats[name]) for name, attn in sites]
    try:
        with quantization_disabled(sam):
            _pass(sam, samples[:BIG_IMAGES], forward, "BIG keys")
    finally:
        for hook in hooks:
            hook.remove()
    p = qconfig.ptq4sam
    folded = {}
    for name, attn in sites:
        site = stats[name]
        if site.sum is None:
            raise RuntimeError(f"BIG: attention {name} saw no boxes in the calibration images")
        folded[name] = is_bimodal(site.sample, p.global_num, p.peak_distance, p.peak_height,
                                  seed=qconfig.seed)
        if folded[name]:
            fold_sign(attn.q_proj, attn.k_proj, (site.sum / site.rows)[None])
        logger.info("BIG %s: %s", name, "bimodal, sign folded" if folded[name] else "unimodal, unchanged")
    return folded


def _moment_factor(moment: torch.Tensor) -> torch.Tensor:
    """Rows ``R`` with ``mean_rows(R_i^T R_i) = M``, so that ``error_energy(R, V) = diag(V M V^T)``."""
    evals, evecs = torch.linalg.eigh(moment)
    return (evecs * evals.clamp_min(0).sqrt()).T * moment.shape[0] ** 0.5


@torch.no_grad()
def condition_linears(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, cfg: ACNRConfig
) -> dict[str, dict[str, float | bool]]:
    """ACNR on every quantized Linear with an input quantizer (needs calibrated input quantizers)."""
    layers = [(n, m) for n, m in sam.named_modules()
              if isinstance(m, QuantLinear) and m.input_quantizer is not None]
    moments: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = dict.fromkeys((n for n, _ in layers), 0)

    def hook(name: str, layer: QuantLinear) -> Callable:
        def record(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0].reshape(-1, layer.in_features)
            dx = (x - layer.input_quantizer.fake_quant(x)).double()
            moment = dx.T @ dx / max(len(dx), 1)
            moments[name] = moments[name] + moment if name in moments else moment
            calls[name] += 1
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers]
    try:
        with quantization_disabled(sam):
            _pass(sam, samples[: cfg.calib], forward, "ACNR errors")
    finally:
        for handle in handles:
            handle.remove()
    report = {}
    for name, layer in tqdm(layers, desc="ACNR", unit="layer"):
        if not calls[name]:
            continue
        factor = _moment_factor(moments.pop(name) / calls[name])
        result = apply_acnr_(
            layer.to_float(), factor, iters=cfg.iters, lam=cfg.lam, beta=cfg.beta, energy=cfg.energy,
            min_cond=cfg.min_cond, target=cfg.target,
        )
        report[name] = {"cond_before": result.cond_before, "cond_after": result.cond_after,
                        "skipped": result.skipped}
    return report


def group_weights(model: nn.Module, k: int, seed: int = 0) -> dict[str, int]:
    """Group the output channels of every calibrated per-channel weight grid into at most ``k`` shared
    grids (``group_weight_grid``); ``{layer: groups}``. Per-tensor weight grids are one group already."""
    groups = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, (QuantLinear, QuantConv2d)) or layer.weight_quantizer is None:
            continue
        if getattr(layer.weight_quantizer, "ch_axis", None) is not None:
            groups[name] = group_weight_grid(layer.weight_quantizer, layer.weight, k, seed=seed)
    return groups


def calibrate(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, qconfig: QConfig
) -> CalibrationReport:
    """BIG, statistics, ACNR and weight grouping (as ``qconfig`` asks) on ``samples``; every quantizer ends
    calibrated.

    ``forward(sample)`` runs the quantized SAM on one calibration sample (encoder and decoder).
    """
    if not samples:
        raise ValueError("calibration needs at least one calibration image")
    report = CalibrationReport(images=len(samples))
    if qconfig.ptq4sam.big:
        report.big = apply_big(sam, samples, forward, qconfig)
    with calibrating(sam):
        _pass(sam, samples, forward, "calibrate")
    report.passes = 1
    if qconfig.acnr.enabled:
        report.acnr = condition_linears(sam, samples, forward, qconfig.acnr)
        if any(not r["skipped"] for r in report.acnr.values()):
            with calibrating(sam):
                _pass(sam, samples, forward, "recalibrate")
            report.passes = 2
    if qconfig.cag.apply_to_weights:
        report.weight_groups = group_weights(sam, qconfig.cag.weight_groups, qconfig.seed)
    return report


def switch_to_evaluation(model: nn.Module) -> None:
    """The state evaluation needs: AdaRound weights no reconstruction hardened are rounded to nearest, CAG
    quantizers no reconstruction merged are merged to their final group count, then every quantizer is
    switched on, and that is checked."""
    for _, q in iter_quantizers(model):
        if isinstance(q, AdaRoundQuantizer) and not q.is_hard:
            q.harden()
        elif isinstance(q, CAGQuantizer):
            q.merge_to_target()
    set_mode(model, Mode.QUANTIZE)
    assert_fully_quantized(model)
