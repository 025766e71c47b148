"""Fill the activation cache: one float pass over the calibration set, then unit-by-unit propagation.

``capture`` runs the model once, with every quantizer off, and hooks every unit: each unit's float inputs
and compared float outputs are cached per (sample, chunk). The quantized inputs of the first unit equal its
float inputs unless a quantizer outside the units runs before it; only then does one quantized pass collect
them. After unit ``k`` is finished, ``propagate`` runs *only unit k* on its quantized inputs and feeds the
result to unit ``k+1``; nothing before the units (a detector, a float encoder) is ever run again.

Cache keys: ``CacheKey(entry, unit, sample, chunk)``, ``entry`` being the unit's float inputs, float outputs
or quantized inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ahcq.progress import progress_bar
from ahcq.quantization.api import iter_quantizers, quantization_disabled
from ahcq.quantization.quantizers import Mode

from .cache import ActivationCache, CacheKey, Entry, ItemPlan
from .units import Inputs, ReconUnit, map_tensors, tensor_leaves

__all__ = ["CaptureIndex", "capture", "module_device", "propagate", "release", "to_device"]

Forward = Callable[[nn.Module, Any], Any]


@dataclass
class CaptureIndex:
    """What the cache holds: chunk count per (unit, sample), and whether unit 0's quantized inputs are its
    float inputs (``qin_is_fin``)."""

    chunks: dict[tuple[int, int], int] = field(default_factory=dict)
    qin_is_fin: bool = True

    def entries(self, unit: int) -> list[tuple[int, int]]:
        """``(sample, chunk)`` pairs of ``unit``."""
        return [(s, c) for (u, s), n in sorted(self.chunks.items()) if u == unit for c in range(n)]

    def qin_key(self, unit: int, sample: int, chunk: int) -> CacheKey:
        entry = Entry.FLOAT_IN if unit == 0 and self.qin_is_fin else Entry.QUANT_IN
        return CacheKey(entry, unit, sample, chunk)


def module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter or buffer (CPU when it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    return map_tensors(value, lambda t: t.to(device))


def _n_items(inputs: Inputs, unit: ReconUnit) -> int:
    for t in tensor_leaves(inputs):
        if t.dim() >= 1:
            return t.shape[0]
    raise ValueError(f"unit {unit.name!r}: its inputs hold no tensor with a batch axis")


class _Recorder:
    """Forward hooks storing one sample's unit inputs and outputs in the cache."""

    def __init__(self, units: Sequence[ReconUnit], cache: ActivationCache, plan: ItemPlan,
                 index: CaptureIndex, kinds: tuple[Entry, ...],
                 prefix_watch: Sequence[nn.Module] = ()) -> None:
        self.units, self.cache, self.plan, self.index, self.kinds = units, cache, plan, index, kinds
        self.sample = 0
        self.seen: set[int] = set()
        self.items: dict[int, int] = {}
        self.first_outputs: dict[int, Any] = {}
        self.prefix_quantizer_ran = False
        self._handles = []
        for k, unit in enumerate(units):
            self._handles.append(unit.module.register_forward_pre_hook(self._pre(k), with_kwargs=True))
            if Entry.FLOAT_OUT in kinds:
                self._handles.append(unit.module.register_forward_hook(self._post(k)))
        for q in prefix_watch:
            self._handles.append(q.register_forward_pre_hook(self._watch))

    def _watch(self, module: nn.Module, args: tuple) -> None:
        if not self.seen:
            self.prefix_quantizer_ran = True

    def start(self, sample: int) -> None:
        self.sample = sample
        self.seen = set()

    def _pre(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            unit = self.units[k]
            if k in self.seen:
                raise RuntimeError(f"unit {unit.name!r} ran twice for one sample; a unit must run once per "
                                   f"forward (reconstruct a module that is called once)")
            self.seen.add(k)
            inputs = (tuple(args), dict(kwargs))
            n = self.items[k] = _n_items(inputs, unit)
            chunks = self.plan.split(inputs, self.sample, n)
            self.index.chunks[(k, self.sample)] = len(chunks)
            for c, chunk in enumerate(chunks):
                self.cache.put(CacheKey(self.kinds[0], k, self.sample, c), chunk)
        return hook

    def _post(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            unit = self.units[k]
            n = self.items[k]
            full = self.plan.split(output, self.sample, n)
            if self.sample == 0 and k + 1 < len(self.units):
                self.first_outputs[k] = map_tensors(full[0], torch.Tensor.clone)
            for c, chunk in enumerate(full):
                self.cache.put(CacheKey(Entry.FLOAT_OUT, k, self.sample, c), unit.select(chunk))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _check_chain(units: Sequence[ReconUnit], cache: ActivationCache, first_outputs: dict[int, Any]) -> None:
    """Each unit's ``feed`` applied to the previous float output must give its float inputs back (both at
    the cache's storage precision)."""
    for k in range(1, len(units)):
        own = cache.get(CacheKey(Entry.FLOAT_IN, k, 0, 0))
        fed = cache.as_stored(units[k].feed(first_outputs[k - 1], own))
        a, b = tensor_leaves(fed), tensor_leaves(own)
        same = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
        if not same:
            raise ValueError(
                f"unit {units[k].name!r}: its float inputs are not what its feed makes of unit "
                f"{units[k - 1].name!r}'s float output; give ReconUnit.feed for it (or choose units whose "
                f"output is the next unit's input)")


def _run_samples(model: nn.Module, samples: Sequence[Any], forward: Forward, rec: _Recorder, desc: str,
                 progress: bool) -> None:
    for s, sample in enumerate(progress_bar(samples, desc=desc, disable=not progress, leave=False)):
        rec.start(s)
        forward(model, sample)
        missing = [u.name for k, u in enumerate(rec.units) if k not in rec.seen]
        if missing:
            raise RuntimeError(f"sample {s}: units {missing} did not run in the model's forward")


@torch.no_grad()
def capture(model: nn.Module, units: Sequence[ReconUnit], samples: Sequence[Any], forward: Forward,
            cache: ActivationCache, plan: ItemPlan, progress: bool = True) -> CaptureIndex:
    """Cache float inputs/outputs of every unit (one float pass) and unit 0's quantized inputs."""
    if not samples:
        raise ValueError("capture: no calibration samples")
    index = CaptureIndex()
    in_units = {id(q) for u in units for q in u.quantizers}
    outside = [q for _, q in iter_quantizers(model) if id(q) not in in_units and q.mode is not Mode.OFF]
    was_training = model.training
    model.eval()
    rec = _Recorder(units, cache, plan, index, (Entry.FLOAT_IN, Entry.FLOAT_OUT), outside)
    try:
        with quantization_disabled(model):
            _run_samples(model, samples, forward, rec, "capture float", progress)
    finally:
        rec.remove()
    try:
        _check_chain(units, cache, rec.first_outputs)
        if rec.prefix_quantizer_ran:
            index.qin_is_fin = False
            first = _Recorder(units[:1], cache, plan, CaptureIndex(), (Entry.QUANT_IN,))
            try:
                _run_samples(model, samples, forward, first, "capture quantized", progress)
            finally:
                first.remove()
    finally:
        model.train(was_training)
    return index


@torch.no_grad()
def propagate(units: Sequence[ReconUnit], k: int, cache: ActivationCache, index: CaptureIndex,
              progress: bool = True) -> None:
    """Quantized inputs of unit ``k+1`` = its feed of unit ``k``'s quantized output on unit ``k``'s quantized
    inputs (unit ``k`` only, chunk by chunk)."""
    unit, nxt = units[k], units[k + 1]
    src, dst = index.entries(k), index.entries(k + 1)
    if src != dst:
        raise ValueError(f"units {unit.name!r} and {nxt.name!r} have different item chunks; chained units "
                         f"need the same item count per sample")
    device = module_device(unit.module)
    was_training = unit.module.training
    unit.module.eval()
    try:
        for s, c in progress_bar(src, desc=f"propagate {unit.name}", disable=not progress, leave=False):
            out = unit.call(unit.module, to_device(cache.get(index.qin_key(k, s, c)), device))
            out = map_tensors(out, lambda t: t.cpu())
            cache.put(CacheKey(Entry.QUANT_IN, k + 1, s, c),
                      nxt.feed(out, cache.get(CacheKey(Entry.FLOAT_IN, k + 1, s, c))))
    finally:
        unit.module.train(was_training)


def release(cache: ActivationCache, index: CaptureIndex, k: int) -> None:
    """Free unit ``k``'s entries once it is finished and its successor's inputs exist."""
    for s, c in index.entries(k):
        for entry in Entry:
            cache.pop(CacheKey(entry, k, s, c))
