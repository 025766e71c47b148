"""Optimisation of one reconstruction unit (BRECQ / QDrop / AHCPTQ recipe).

Two Adams: AdaRound logits at ``weight_lr`` (constant), every other learnable quantizer parameter (LSQ,
CAG group, HLUQ ``s1``/``s2``, AGQ scales) at ``scale_lr`` with one cosine schedule over the unit's steps.
CAG quantizers regroup to ``8G, 4G, 2G, G`` at the ``regroup_fractions`` of the steps; their scale Parameter
keeps its identity, only its Adam moments restart, and the schedule goes on (no restart, unlike the
reference). QDrop: each element of the quantized input is replaced by the float one with probability
``1 - drop_prob`` and the unit's activation quantizers drop with the same probability (``drop_prob`` is the
probability of staying quantized; 1.0 = BRECQ).

Loss: ``sum over one axis of (pred - target)^2, mean over every other axis`` per compared output, times the
unit's weight for that output (SAQ-SAM's prompt-aware decoder loss), plus the rounding regulariser
``weight * sum(1 - |2h - 1|^b)`` from ``warm_up * iters`` on, ``b`` annealed over ``b_range``, plus an
optional caller term. The summed axis is ``loss_axis``: the unit's declared channel axis (``channels``) or
the references' fixed axis 1 (``axis1``, whatever it holds) or last axis (``last``, SAQ-SAM). With
``act_quant`` false (BRECQ's reference) the activation quantizers stay off while the unit trains. A unit
always ends hardened, and fully quantized unless its activations are deliberately off.

Early stopping (``patience``) watches the smoothed loss while no rounding regulariser applies. At a plateau
in the warm-up, the warm-up ends there and the whole schedule (annealing, regroups, LR) shrinks to
``plateau_horizon`` steps, so the roundings still anneal fully; a unit with nothing to anneal just stops.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ahcq.progress import progress_bar
from ahcq.quantization.api import assert_fully_quantized, dropping
from ahcq.quantization.config import LossAxis
from ahcq.quantization.quantizers import (
    BetaSchedule,
    CAGQuantizer,
    Mode,
    Quantizer,
    Role,
    progressive_schedule,
)
from ahcq.quantization.quantizers.base import keep_mask
from ahcq.seeding import stream

from .settings import ReconSettings
from .units import Inputs, ReconUnit, adaround_quantizers, map_tensors, scale_parameters

__all__ = ["ExtraLoss", "LossContext", "UnitReport", "reconstruct_unit", "unit_loss"]

@dataclass
class LossContext:
    """What an extra loss term sees: the unit, its index, the samples and chunks of the batch, the (QDrop
    mixed) inputs, the quantized output and the float targets of the compared outputs."""

    unit: ReconUnit
    unit_index: int
    entries: list[tuple[int, int]]
    inputs: Inputs
    output: Any
    targets: list[torch.Tensor]


ExtraLoss = Callable[[LossContext], torch.Tensor]
GradSync = Callable[[Sequence[torch.Tensor]], None]  # averages the tensors over data-parallel ranks, in place


@dataclass
class UnitReport:
    """Per-unit record: steps run, first and last (smoothed) reconstruction loss, the scale LR at every step,
    the regroups ``(step, groups)``."""

    name: str
    steps: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    stopped_early: bool = False
    seconds: float = 0.0
    scale_lrs: list[float] = field(default_factory=list)
    regroups: list[tuple[int, int]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The JSON-able summary a results file keeps (non-finite losses as ``None``)."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None
        return {"name": self.name, "steps": self.steps, "loss_first": finite(self.first_loss),
                "loss_last": finite(self.last_loss), "stopped_early": self.stopped_early,
                "seconds": round(self.seconds, 3), "regroups": [list(r) for r in self.regroups]}


def unit_loss(unit: ReconUnit, output: Any, targets: Sequence[torch.Tensor],
              loss_axis: LossAxis = LossAxis.CHANNELS) -> torch.Tensor:
    """Sum over ``loss_axis`` of the squared error, mean over the other axes, weighted over outputs."""
    preds = unit.select(output)
    if len(preds) != len(targets):
        raise ValueError(f"unit {unit.name!r}: {len(preds)} outputs but {len(targets)} targets")
    dim = {LossAxis.CHANNELS: unit.feature_axis, LossAxis.AXIS1: 1, LossAxis.LAST: -1}[LossAxis(loss_axis)]
    weights = unit.weights or (1.0,) * len(preds)
    total = preds[0].new_zeros(())
    for p, t, w in zip(preds, targets, weights):
        if p.shape != t.shape:
            raise ValueError(f"unit {unit.name!r}: output of shape {tuple(p.shape)} but target "
                             f"{tuple(t.shape)}")
        if w:
            total = total + w * (p - t).pow(2).sum(dim=dim).mean()
    return total


def _mix(quant: Inputs, floats: Inputs, p: float, generator: torch.Generator) -> Inputs:
    """QDrop input mixing: each element of a floating tensor becomes the float value with probability p."""
    q_leaves: list[torch.Tensor] = []
    map_tensors(quant, q_leaves.append)
    f_leaves: list[torch.Tensor] = []
    map_tensors(floats, f_leaves.append)
    if len(q_leaves) != len(f_leaves):
        raise ValueError("QDrop: quantized and float inputs have different structures")
    pairs = iter(zip(q_leaves, f_leaves))

    def mix(q: torch.Tensor) -> torch.Tensor:
        _, f = next(pairs)
        if not q.is_floating_point() or q is f:
            return q
        return torch.where(keep_mask(q.shape, p, generator, q.device), f.to(q.device), q)
    return map_tensors(quant, mix)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over each parameter instead of about ten) where torch has it."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused)


def _regroup_plan(unit: ReconUnit, settings: ReconSettings) -> list[tuple[float, CAGQuantizer, int]]:
    """``(fraction of the unit's steps, quantizer, groups)`` of every CAG regroup round in the unit."""
    plan = []
    for q in unit.quantizers:
        if not isinstance(q, CAGQuantizer) or q.target_groups is None:
            continue
        channels = q.group_index.numel()
        targets = progressive_schedule(q.target_groups)[-len(settings.regroup_fractions):]
        fractions = settings.regroup_fractions[-len(targets):]
        plan.extend((f, q, min(g, channels)) for f, g in zip(fractions, targets))
    return sorted(plan, key=lambda item: item[0])


def _regroup_step(fraction: float, total: int) -> int:
    return max(1, math.floor(fraction * total))


def _regroup(q: CAGQuantizer, groups: int, optimizer: torch.optim.Optimizer | None) -> None:
    """Regroup ``q``; parameters it replaced leave the optimizer, new ones join it, and the Adam state of
    every parameter of ``q`` restarts (its entries now mean other groups). The LR schedule is untouched."""
    before = {id(p) for p in q.parameters(recurse=False)}
    q.regroup(groups)
    if optimizer is None:
        return
    after = [p for p in q.parameters(recurse=False) if p.requires_grad]
    kept = {id(p) for p in after}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in before or id(p) in kept]
    listed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    optimizer.param_groups[0]["params"].extend(p for p in after if id(p) not in listed)
    for p in after:
        optimizer.state.pop(p, None)


class _Plateau:
    """A plateau of the smoothed (EMA 0.9) reconstruction loss: ``patience`` watched updates without an
    improvement below ``(1 - min_delta)`` times the best value. ``patience=None`` never finds one."""

    def __init__(self, patience: int | None, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.first = self.ema = math.nan
        self.best, self.wait = math.inf, 0

    def update(self, value: float, watch: bool) -> bool:
        self.first = value if math.isnan(self.first) else self.first
        self.ema = value if math.isnan(self.ema) else 0.9 * self.ema + 0.1 * value
        if self.patience is None or not watch:
            return False
        if self.ema < self.best * (1.0 - self.min_delta):
            self.best, self.wait = self.ema, 0
        else:
            self.wait += 1
        return self.wait >= self.patience


def plateau_horizon(steps_done: int, settings: ReconSettings) -> int:
    """A unit's step count once its loss plateaued after ``steps_done`` warm-up steps: the warm-up ends there
    and the annealed rounding phase keeps the schedule's proportion, ``steps_done / warm_up`` steps in all
    (at most ``iters``). Stopping inside the annealing instead would harden half-annealed roundings."""
    return min(settings.iters, max(steps_done + 1, math.ceil(steps_done / settings.warm_up)))


def _descend(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer | None],
             sync: GradSync | None = None, also: Sequence[torch.Tensor] = ()) -> None:
    """One step; with ``sync`` (data-parallel ranks) the gradients, and ``also``, are first averaged over
    the ranks so every rank takes the same step."""
    active = [opt for opt in optimizers if opt is not None]
    for opt in active:
        opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    if sync is not None:
        params = [t for opt in active for g in opt.param_groups for t in g["params"]]
        grads = [t.grad for t in params if t.grad is not None]
        sync([*grads, *also])
    for opt in active:
        opt.step()


def _finish(unit: ReconUnit, act_quant: bool) -> None:
    """Harden every AdaRound of the unit and require the evaluation state (no soft rounding, no dropping;
    the activation quantizers may be off only when they were deliberately)."""
    for q in adaround_quantizers(unit):
        q.harden()
    soft = [q.name for q in adaround_quantizers(unit) if not q.is_hard]
    if soft:
        raise RuntimeError(f"unit {unit.name!r}: AdaRound still soft after hardening: {soft}")
    if unit.quantizers and act_quant:
        assert_fully_quantized(unit.module)


def _expected_mode(q: Quantizer, act_quant: bool) -> Mode:
    return Mode.QUANTIZE if act_quant or q.role is Role.WEIGHT else Mode.OFF


def reconstruct_unit(
    unit: ReconUnit,
    unit_index: int,
    settings: ReconSettings,
    batch: Callable[[torch.Generator], tuple[list[tuple[int, int]], Inputs, Inputs, list[torch.Tensor]]],
    extra_loss: ExtraLoss | None = None,
    progress: bool = True,
    sync: GradSync | None = None,
) -> UnitReport:
    """Train ``unit`` for ``settings.iters`` steps (or until early stop) and leave it hardened.

    ``batch(generator)`` returns ``(entries, quantized inputs, float inputs, float targets)`` on the unit's
    device. The unit's quantizers must be calibrated and in ``Mode.QUANTIZE``. ``sync`` averages tensors
    over data-parallel ranks in place (each rank batching its own samples): gradients and the loss that
    early stopping watches, so every rank keeps the same parameters and stops at the same step.
    """
    report = UnitReport(unit.name)
    start = time.perf_counter()
    if unit.iters is not None:
        settings = dataclasses.replace(settings, iters=unit.iters)
    not_ready = [q.name for q in unit.quantizers if q.mode is not _expected_mode(q, settings.act_quant)]
    if not_ready:
        state = "QUANTIZE mode" if settings.act_quant else "QUANTIZE mode (weights) / OFF (activations)"
        raise RuntimeError(f"unit {unit.name!r}: quantizers not in {state}: {not_ready}")
    already = [q.name for q in adaround_quantizers(unit) if q.is_hard]
    if already:
        raise RuntimeError(f"unit {unit.name!r}: AdaRound already hardened (reconstructed twice?): {already}")
    rounding = [q.alpha for q in adaround_quantizers(unit)]
    scales = scale_parameters(unit)
    opt_w = _adam(rounding, settings.weight_lr) if rounding else None
    opt_s = _adam(scales, settings.scale_lr) if scales else None
    # beta.iters is the unit's step count (early stopping shortens it once); the LR cosine reads it too
    beta = BetaSchedule(settings.iters, settings.b_range[0], settings.b_range[1], settings.warm_up)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt_s, lambda t: (1 + math.cos(math.pi * min(t, beta.iters) / beta.iters)) / 2) if opt_s else None
    anneals = bool(rounding) and settings.weight > 0 and settings.warm_up > 0
    regroups = _regroup_plan(unit, settings)
    masks, batches = stream(settings.seed, "qdrop", unit_index), stream(settings.seed, "batches", unit_index)
    p = settings.float_p
    trained = {id(t) for t in rounding + scales}
    frozen = [t for t in unit.module.parameters() if t.requires_grad and id(t) not in trained]
    was_training = unit.module.training
    for t in frozen:
        t.requires_grad_(False)
    unit.module.eval()
    plateau = _Plateau(settings.patience, settings.min_delta)
    bar = progress_bar(total=settings.iters, desc=f"recon {unit.name}", disable=not progress, leave=False)
    try:
        with dropping(unit.module, p, masks) if p > 0 else nullcontext():
            step = 0
            while step < beta.iters:
                while regroups and _regroup_step(regroups[0][0], beta.iters) <= step:
                    _, q, groups = regroups.pop(0)
                    _regroup(q, groups, opt_s)
                    report.regroups.append((step, groups))
                entries, quant, floats, targets = batch(batches)
                inputs = _mix(quant, floats, p, masks) if p > 0 else quant
                output = unit.call(unit.module, inputs)
                rec = unit_loss(unit, output, targets, settings.loss_axis)
                if extra_loss is not None:
                    rec = rec + extra_loss(LossContext(unit, unit_index, entries, inputs, output, targets))
                loss = rec
                if rounding and beta.active(step) and settings.weight > 0:
                    b = beta(step)
                    loss = loss + settings.weight * sum(q.regularizer(b) for q in adaround_quantizers(unit))
                watched = rec.detach().reshape(1).clone()
                _descend(loss, (opt_w, opt_s), sync, (watched,))
                if sched is not None:
                    report.scale_lrs.append(sched.get_last_lr()[0])
                    sched.step()
                step += 1
                bar.update()
                report.steps = step
                if plateau.update(float(watched), watch=not (anneals and beta.active(step - 1))):
                    report.stopped_early = True
                    if not anneals:
                        break
                    beta = dataclasses.replace(beta, iters=plateau_horizon(step, settings))
                    plateau.patience = None  # the horizon is set once
                    bar.total = beta.iters
                    bar.refresh()
        for _, q, groups in regroups:
            _regroup(q, groups, None)
            report.regroups.append((report.steps, groups))
    finally:
        bar.close()
        for t in frozen:
            t.requires_grad_(True)
        unit.module.train(was_training)
    _finish(unit, settings.act_quant)
    report.first_loss, report.last_loss = plateau.first, plateau.ema
    report.seconds = time.perf_counter() - start
    return report
