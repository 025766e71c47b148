"""Block reconstruction of a calibrated, quantized model, unit by unit (BRECQ, QDrop, AHCPTQ, SAQ-SAM).

``reconstruct`` is model-agnostic: the caller gives the units in forward order (``units``), the
calibration samples and how to run the model on one. The model runs once in float to fill the activation
cache (``capture``); each unit is then trained on its cached inputs (``train``), hardened, and
run once to make the next unit's quantized inputs. With ``state_dir`` the run saves after every unit and an
interrupted run resumes from the last finished unit with the same final state (``state``); the saved
state holds the calibration too, so the resuming process only needs the quantized (uncalibrated) model.
AdaRound weights that belong to no unit are rounded to nearest at the start (never left soft).

Guarantees on return: every AdaRound in every unit is hard and every quantizer of the model is in
``Mode.QUANTIZE`` without dropping (``assert_fully_quantized``), so QDrop can never leak into evaluation.
With ``act_quant`` false (BRECQ's reference) the activation quantizers are off from the capture to the last
unit, so the units train and propagate with float activations; they come back on at the end.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ahcq.progress import progress_bar
from ahcq.quantization.api import activations_off, assert_fully_quantized, iter_quantizers, set_mode
from ahcq.quantization.quantizers import AdaRoundQuantizer, Mode
from ahcq.seeding import seed_everything

from .cache import ActivationCache, CacheKey, Entry, ItemPlan
from .capture import CaptureIndex, capture, module_device, propagate, release, to_device
from .settings import ReconSettings
from .state import load_state, save_state, saved_units
from .train import ExtraLoss, GradSync, UnitReport, reconstruct_unit
from .units import Inputs, ReconUnit

__all__ = ["ReconResult", "default_forward", "reconstruct"]

UnitCallback = Callable[[int, ReconUnit, UnitReport], None]
logger = logging.getLogger(__name__)


def default_forward(model: nn.Module, sample: Any) -> Any:
    """``model(*sample)`` for a tuple sample, ``model(**sample)`` for a dict, ``model(sample)`` otherwise."""
    if isinstance(sample, tuple):
        return model(*sample)
    if isinstance(sample, dict):
        return model(**sample)
    return model(sample)


@dataclass
class ReconResult:
    """Per-unit reports of the units trained in this call, where it started, and cache usage."""

    reports: list[UnitReport] = field(default_factory=list)
    resumed_at: int = 0
    peak_cache_bytes: int = 0
    spilled_bytes: int = 0


def _concat(values: list[Any]) -> Any:
    """Stack parallel structures along dim 0 (tensors); other leaves must agree."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values]) for k in first}
    if any(v != first for v in values[1:]):
        raise ValueError(f"cannot batch samples whose non-tensor inputs differ ({first!r})")
    return first


def _batcher(cache: ActivationCache, index: CaptureIndex, k: int, batch_size: int,
             device: torch.device) -> Callable[[torch.Generator], tuple]:
    entries = index.entries(k)

    def batch(generator: torch.Generator) -> tuple[list[tuple[int, int]], Inputs, Inputs, list[torch.Tensor]]:
        picks = [entries[i] for i in torch.randint(len(entries), (batch_size,), generator=generator).tolist()]
        floats = [cache.get(CacheKey(Entry.FLOAT_IN, k, s, c)) for s, c in picks]
        same = index.qin_key(k, 0, 0).entry is Entry.FLOAT_IN  # unit 0 behind a float prefix: no mixing
        quant = floats if same else [cache.get(index.qin_key(k, s, c)) for s, c in picks]
        targets = [cache.get(CacheKey(Entry.FLOAT_OUT, k, s, c)) for s, c in picks]
        if batch_size == 1:
            floats, quant, targets = floats[0], quant[0], targets[0]
        else:
            floats, quant, targets = _concat(floats), _concat(quant) if not same else None, _concat(targets)
        floats = to_device(floats, device)
        quant = floats if same else to_device(quant, device)
        return picks, quant, floats, to_device(targets, device)
    return batch


def harden_outside(model: nn.Module, units: Sequence[ReconUnit]) -> None:
    """AdaRound weights outside every unit are never trained: round them to nearest now, before they feed
    the first unit, rather than leaving soft logits that evaluate as the float weights."""
    inside = {id(q) for u in units for q in u.quantizers}
    for _, q in iter_quantizers(model):
        if isinstance(q, AdaRoundQuantizer) and id(q) not in inside and not q.is_hard:
            q.harden()


def _resume(state_dir: str | Path, model: nn.Module, names: list[str], settings: ReconSettings,
            sync: GradSync | None) -> int:
    """Load the saved state to resume from; the index of the next unit (0: none). Data-parallel ranks take
    the latest unit every rank holds a state for (they can be one unit apart after a kill)."""
    if sync is None:
        return load_state(state_dir, model, names, settings) or 0
    saved = saved_units(state_dir)
    held = torch.zeros(len(names) + 1, dtype=torch.float64)
    held[0] = 1.0
    for unit in saved:
        held[unit] = 1.0
    sync([held])
    agreed = max(int(i) for i in torch.nonzero(held == 1.0).flatten())
    return (load_state(state_dir, model, names, settings, saved[agreed].name) or 0) if agreed else 0


def reconstruct(
    model: nn.Module,
    units: Sequence[ReconUnit],
    samples: Sequence[Any],
    settings: ReconSettings,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    *,
    max_cache_gb: float = 8.0,
    cache_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
    extra_loss: ExtraLoss | None = None,
    on_unit_end: UnitCallback | None = None,
    progress: bool = True,
    sync: GradSync | None = None,
) -> ReconResult:
    """Reconstruct ``units`` of the calibrated ``model`` in order; see the module docstring.

    ``max_cache_gb``: CPU memory for cached activations; the rest spills to ``cache_dir`` (a temporary
    folder by default). ``state_dir``: save after each unit and resume from it. ``on_unit_end(k, unit,
    report)`` runs after unit ``k`` is finished and saved. ``sync``: data-parallel ranks, each holding its
    own ``samples``, average gradients every step (``train.reconstruct_unit``).
    """
    if not units:
        raise ValueError("reconstruct: no units")
    if max_cache_gb < 0:
        raise ValueError(f"reconstruct: max_cache_gb must be >= 0, got {max_cache_gb}")
    names = [u.label for u in units]
    seed_everything(settings.seed)
    result = ReconResult()
    if state_dir is not None:
        result.resumed_at = _resume(state_dir, model, names, settings, sync)
        if result.resumed_at:
            logger.info("reconstruction: resuming at unit %d of %d (%s)", result.resumed_at + 1, len(units),
                        units[min(result.resumed_at, len(units) - 1)].name)
    set_mode(model, Mode.QUANTIZE)
    harden_outside(model, units)
    if result.resumed_at >= len(units):
        assert_fully_quantized(model)
        return result
    plan = ItemPlan(settings.seed, settings.max_items, settings.chunk_items)
    storage = settings.cache_dtype.torch
    floats = activations_off(model) if not settings.act_quant else contextlib.nullcontext()
    with ActivationCache(int(max_cache_gb * 2**30), cache_dir, storage) as cache, floats:
        index = capture(model, units, samples, forward, cache, plan, progress)
        for k in range(result.resumed_at):
            propagate(units, k, cache, index, progress)
            release(cache, index, k)
        for k in progress_bar(range(result.resumed_at, len(units)), desc="reconstruction",
                              disable=not progress, initial=result.resumed_at, total=len(units)):
            unit = units[k]
            batch = _batcher(cache, index, k, settings.batch_size, module_device(unit.module))
            report = reconstruct_unit(unit, k, settings, batch, extra_loss, progress, sync)
            if k + 1 < len(units):
                propagate(units, k, cache, index, progress)
            release(cache, index, k)
            result.reports.append(report)
            logger.info("reconstruction unit %d/%d %s: %d steps, loss %.4g -> %.4g, %.1f s", k + 1,
                        len(units), unit.name, report.steps, report.first_loss, report.last_loss,
                        report.seconds)
            if state_dir is not None:
                save_state(state_dir, model, k + 1, names, settings, keep_previous=sync is not None)
            if on_unit_end is not None:
                on_unit_end(k, unit, report)
        result.peak_cache_bytes, result.spilled_bytes = cache.peak_memory_bytes, cache.spilled_bytes
    assert_fully_quantized(model)
    return result
