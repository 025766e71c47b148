"""Calibration of a quantized SAM on cached calibration samples: BIG, statistics, ACNR, recalibration;
then ``switch_to_evaluation``.

Order (each step on float activations, so no step sees another's rounding):

1. BIG (``ptq4sam.BIG``): with every quantizer off, pool the key-projection outputs of each token->image
   attention over the first ``BIG_IMAGES`` calibration images (all their boxes; the KDE sees a random
   ``BIG_SAMPLE_POINTS`` values per decoder call); where it finds two peaks, fold the per-channel sign of
   the mean key into ``q_proj``/``k_proj`` (scores unchanged). The references decided on one box of
   one image.
2. Statistics: every quantizer observes all calibration images (weights their first batch).
3. ACNR (``acnr.enabled``, AHCQ-SAM): per quantized Linear, in forward order, the input error is summarised
   by its second moment ``E[dX^T dX]`` pooled over every token (bounded memory whatever the token count) and
   the weight is conditioned against it. ``acnr.error: accumulated`` (the AHCQ-SAM code) takes
   ``dX = X_float - Q(X_quant)``: the layer's input in the original float model minus its quantized input in
   the current model with every activation quantizer on and the weights float, so it includes the error of
   everything upstream, the layers already conditioned included; ``local`` takes ``dX = X - Q(X)`` on the
   float model for every layer at once. Each conditioned layer first remembers its original weight, so
   every float target after ACNR (``api.quantization_disabled``) is the model as it was before. Then every
   quantizer is calibrated again, since the conditioned weights change the activations downstream and the
   weights themselves.
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

from ahcq.models.sam_roles import big_sites
from ahcq.progress import progress_bar
from ahcq.quantization.api import (
    activations_quantized,
    assert_fully_quantized,
    calibrating,
    iter_quantizers,
    quantization_disabled,
    set_mode,
)
from ahcq.quantization.config import ACNRConfig, ACNRError, BigTest, QConfig
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.layers import QuantLayer, QuantLinear
from ahcq.quantization.quantizers import AdaRoundQuantizer, CAGQuantizer, Mode
from ahcq.quantization.quantizers.weight_groups import group_weight_grid
from ahcq.quantization.transforms import apply_acnr_, fold_sign, kde_peaks

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
    big: dict[str, dict[str, Any]] = field(default_factory=dict)
    acnr: dict[str, dict[str, float | bool]] = field(default_factory=dict)
    passes: int = 0
    weight_groups: dict[str, int] = field(default_factory=dict)


def _pass(model: nn.Module, samples: Sequence[Any], forward: Forward, desc: str) -> None:
    with torch.no_grad():
        for sample in progress_bar(samples, desc=desc, unit="img"):
            forward(sample)


class _KeyStats:
    """Channel sums of an attention's key projection (for the signs) and a bounded random sample of its
    values (for the KDE), so memory does not grow with boxes x tokens. With ``first_box`` (the reference)
    only the first call counts: the KDE sees every value of its first box, the signs its mean."""

    def __init__(self, generator: torch.Generator, first_box: bool = False) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.sample: list[torch.Tensor] = []
        self.generator = generator
        self.first_box = first_box

    def __call__(self, _module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if self.first_box and self.sum is not None:
            return
        flat = out.detach().reshape(-1, out.shape[-1])
        total = flat.double().sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.rows += len(flat)
        if self.first_box:
            self.sample.append(out.detach()[0].reshape(-1).cpu())
            return
        values = flat.reshape(-1)
        picks = torch.randint(len(values), (min(BIG_SAMPLE_POINTS, len(values)),), generator=self.generator)
        self.sample.append(values[picks.to(values.device)].cpu())


@torch.no_grad()
def apply_big(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, qconfig: QConfig,
    sites: Sequence[tuple[str, nn.Module]] | None = None,
) -> dict[str, bool]:
    """Fold BIG signs where the key activations are bimodal; ``{attention: {folded, peaks, values}}`` (where
    the density peaks are and the number of key values the test saw).

    ``sites`` are the ``(name, attention)`` pairs to test, each with ``q_proj``/``k_proj`` Linears
    (default: SAM's ``big_sites``; SAM2 passes its own). Keys are pooled over ``samples[:BIG_IMAGES]``
    (``ptq4sam.big_test: pooled``) or taken from the first box of the first sample (``first_box``).
    """
    sites = big_sites(sam) if sites is None else sites
    first_box = qconfig.ptq4sam.big_test is BigTest.FIRST_BOX
    generator = torch.Generator().manual_seed(qconfig.seed)
    stats = {name: _KeyStats(generator, first_box) for name, _ in sites}
    hooks = [attn.k_proj.register_forward_hook(stats[name]) for name, attn in sites]
    try:
        with quantization_disabled(sam):
            _pass(sam, samples[:1 if first_box else BIG_IMAGES], forward, "BIG keys")
    finally:
        for hook in hooks:
            hook.remove()
    p = qconfig.ptq4sam
    report = {}
    for name, attn in sites:
        site = stats[name]
        if site.sum is None:
            raise RuntimeError(f"BIG: attention {name} saw no boxes in the calibration images")
        peaks = kde_peaks(site.sample, p.global_num, p.peak_distance, p.peak_height, seed=qconfig.seed)
        folded = len(peaks) == 2
        if folded:
            fold_sign(attn.q_proj, attn.k_proj, (site.sum / site.rows)[None])
        report[name] = {"folded": folded, "peaks": [round(float(x), 4) for x in peaks],
                        "values": sum(len(s) for s in site.sample)}
        logger.info("BIG %s: %s", name, "bimodal, sign folded" if folded else "unimodal, unchanged")
    return report


def _moment_factor(moment: torch.Tensor) -> torch.Tensor:
    """Rows ``R`` with ``mean_rows(R_i^T R_i) = M``, so that ``error_energy(R, V) = diag(V M V^T)``."""
    evals, evecs = torch.linalg.eigh(moment)
    return (evecs * evals.clamp_min(0).sqrt()).T * moment.shape[0] ** 0.5


def _conditionable(sam: nn.Module) -> list[tuple[str, QuantLinear]]:
    """Every quantized Linear with an input quantizer, in forward (registration) order."""
    return [(n, m) for n, m in sam.named_modules()
            if isinstance(m, QuantLinear) and m.input_quantizer is not None]


class _Moment:
    """``sum(dX^T dX)`` in float64 and the number of rows (tokens) it pools."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, dx: torch.Tensor) -> None:
        dx = dx.reshape(-1, dx.shape[-1]).double()
        self.total = dx.T @ dx if self.total is None else self.total + dx.T @ dx
        self.rows += len(dx)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)


def _record_inputs(layer: nn.Module) -> tuple[list[torch.Tensor], Any]:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    return seen, handle


def _local_moments(sam: nn.Module, layers: list[tuple[str, QuantLinear]], samples: Sequence[Any],
                   forward: Forward) -> dict[str, _Moment]:
    """``dX = X - Q(X)`` of every layer on the float model, one pass."""
    moments = {name: _Moment() for name, _ in layers}

    def hook(name: str, layer: QuantLinear) -> Callable:
        def record(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            moments[name].add(x - layer.input_quantizer.fake_quant(x))
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers]
    try:
        with quantization_disabled(sam):
            _pass(sam, samples, forward, "ACNR errors")
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _accumulated_moment(sam: nn.Module, name: str, layer: QuantLinear, samples: Sequence[Any],
                        forward: Forward) -> _Moment:
    """``dX = X_float - Q(X_quant)`` of one layer: its inputs in the original float model and in the current
    model with the activations quantized, paired call by call on each sample."""
    moment = _Moment()
    with torch.no_grad():
        for sample in samples:
            fp, handle = _record_inputs(layer)
            try:
                with quantization_disabled(sam):
                    forward(sample)
            finally:
                handle.remove()
            quant, handle = _record_inputs(layer)
            try:
                with activations_quantized(sam):
                    forward(sample)
                    if len(fp) != len(quant):
                        raise RuntimeError(f"ACNR {name}: called {len(fp)} times in the float model but "
                                           f"{len(quant)} times in the quantized one on the same sample")
                    for x_fp, x_q in zip(fp, quant):
                        moment.add(x_fp - layer.input_quantizer.fake_quant(x_q))
            finally:
                handle.remove()
    return moment


def _condition_number(layer: QuantLinear) -> float:
    sigma = torch.linalg.svdvals(layer.weight.detach().double())
    return float("inf") if float(sigma.min()) == 0.0 else float(sigma.max() / sigma.min())


@torch.no_grad()
def condition_linears(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, cfg: ACNRConfig
) -> dict[str, dict[str, float | bool]]:
    """ACNR on every quantized Linear with an input quantizer (needs calibrated quantizers), in forward
    order; ``{layer: {cond_before, cond_after, skipped}}``. See the module docstring for ``cfg.error``."""
    layers = _conditionable(sam)
    samples = samples[: cfg.calib]
    local = _local_moments(sam, layers, samples, forward) if cfg.error is ACNRError.LOCAL else {}
    report = {}
    for name, layer in progress_bar(layers, desc="ACNR", unit="layer"):
        cond = _condition_number(layer)
        if cond < cfg.min_cond:
            report[name] = {"cond_before": cond, "cond_after": cond, "skipped": True}
            continue
        moment = local.pop(name) if local else _accumulated_moment(sam, name, layer, samples, forward)
        if moment.rows == 0:
            continue
        layer.remember_float_weight()
        result = apply_acnr_(
            layer.to_float(), _moment_factor(moment.mean()), iters=cfg.iters, lam=cfg.lam, beta=cfg.beta,
            energy=cfg.energy, min_cond=cfg.min_cond, target=cfg.target,
        )
        report[name] = {"cond_before": result.cond_before, "cond_after": result.cond_after,
                        "skipped": result.skipped}
    return report


def group_weights(model: nn.Module, k: int, seed: int = 0) -> dict[str, int]:
    """Group the output channels of every calibrated per-channel weight grid into at most ``k`` shared
    grids (``group_weight_grid``); ``{layer: groups}``. Per-tensor weight grids are one group already."""
    groups = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLayer) or layer.weight_quantizer is None:
            continue
        if isinstance(layer.weight_quantizer.granularity, PerChannel):
            groups[name] = group_weight_grid(layer.weight_quantizer, layer.weight, k, seed=seed)
    return groups


def calibrate(
    sam: nn.Module, samples: Sequence[Any], forward: Forward, qconfig: QConfig,
    big: Sequence[tuple[str, nn.Module]] | None = None, big_samples: int = BIG_IMAGES,
) -> CalibrationReport:
    """BIG, statistics, ACNR and weight grouping (as ``qconfig`` asks) on ``samples``; every quantizer ends
    calibrated.

    ``forward(sample)`` runs the quantized model on one calibration sample (SAM: encoder and decoder; SAM2:
    a tracked clip). ``big``: the attentions BIG tests (default: SAM's ``big_sites``), on the first
    ``big_samples`` samples.
    """
    if not samples:
        raise ValueError("calibration needs at least one calibration image")
    report = CalibrationReport(images=len(samples))
    if qconfig.ptq4sam.big:
        report.big = apply_big(sam, samples[:big_samples], forward, qconfig, big)
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
