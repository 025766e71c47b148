"""Model-level API: swap layers for quantized ones, switch modes, assert the evaluation state.

``quantize(model, act, weight, overrides, skip)`` replaces every ``nn.Linear`` and ``nn.Conv2d`` (exact
types: subclasses such as ``MultiheadAttention``'s output projection are used through their weight
directly, so they stay float) with a ``QuantLinear`` / ``QuantConv2d`` whose quantizers follow the
``QuantSpec``s, and names every quantizer ``<module path>.<slot>``.

Module-name patterns are shell-style (``fnmatch``) unless prefixed ``re:`` (a full-match regex).
An override is ``(pattern, spec)``: ``spec = None`` leaves matching layers float; otherwise a dict whose
keys ``act`` / ``weight`` / ``output`` hold partial ``QuantSpec`` field dicts for that slot (``output`` adds
an output quantizer built from the activation spec; a slot's value ``None`` disables that slot), and
whose other keys are ``QuantSpec`` fields applied to every enabled slot (e.g. ``{"bits": 8}``). Later
overrides win.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .granularity import ChannelGroups, Granularity, PerChannel, PerTensor
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .quantizers import QUANTIZERS, AdaRoundQuantizer, Mode, Quantizer, Role, make_quantizer

__all__ = [
    "NotFullyQuantizedError",
    "QuantSpec",
    "activations_off",
    "activations_quantized",
    "assert_fully_quantized",
    "build_quantizer",
    "calibrating",
    "dropping",
    "iter_quantizers",
    "name_matches",
    "quantization_disabled",
    "quantize",
    "set_mode",
]

SLOTS = ("act", "weight", "output")


@dataclass(frozen=True)
class QuantSpec:
    """Recipe of one quantizer slot.

    ``granularity`` is a type (``PerTensor``, ``PerChannel(axis)``, ``ChannelGroups(groups)``; weights:
    axis 0 is the output channel) and must be one the family supports (CAG: channel groups; LNQ, AGQ, HLUQ:
    per tensor). ``options`` is the family's own options dataclass (e.g. ``HLUQOptions``, ``LNQOptions``;
    ``None``: the family's defaults).
    """

    quantizer: str = "lsq"
    observer: str = "avg_minmax"
    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = PerTensor()
    options: Any = None

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"QuantSpec: unknown quantizer {self.quantizer!r}; "
                             f"choose one of {sorted(QUANTIZERS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec: bits must be an int in 2..8, got {self.bits!r}")
        family = QUANTIZERS[self.quantizer]
        if not isinstance(self.granularity, family.granularities):
            kinds = " or ".join(g.__name__ for g in family.granularities)
            raise ValueError(f"QuantSpec: {self.quantizer!r} is {kinds}, got {self.granularity!r}")
        if self.symmetric and not family.symmetric_ok:
            raise ValueError(f"QuantSpec: {self.quantizer!r} is asymmetric by construction; "
                             "got symmetric=True")
        if self.options is not None and (family.options is None or type(self.options) is not family.options):
            expected = family.options.__name__ if family.options else "no options"
            raise ValueError(f"QuantSpec: {self.quantizer!r} takes {expected}, got {self.options!r}")

    def updated(self, fields: dict[str, Any], where: str) -> QuantSpec:
        """A copy with ``fields`` replaced; unknown field names raise naming ``where``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{where}: unknown QuantSpec field(s) {unknown}; known: {sorted(known)}")
        try:
            return dataclasses.replace(self, **fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def build_quantizer(spec: QuantSpec, role: Role, name: str) -> Quantizer:
    """The quantizer described by ``spec`` for ``role``, named ``name``."""
    family = QUANTIZERS[spec.quantizer]
    kwargs: dict[str, Any] = {"name": name}
    if family.symmetric_ok:
        kwargs["symmetric"] = spec.symmetric
    if family.uses_observer:
        kwargs["observer"] = spec.observer
    if PerChannel in family.granularities:  # the constructor's default axis must not stand in for per tensor
        kwargs["ch_axis"] = spec.granularity.axis if isinstance(spec.granularity, PerChannel) else None
    elif isinstance(spec.granularity, ChannelGroups):
        kwargs["groups"] = spec.granularity.groups
    if spec.options is not None:
        kwargs.update({f.name: getattr(spec.options, f.name) for f in dataclasses.fields(spec.options)})
    return make_quantizer(spec.quantizer, role, spec.bits, **kwargs)


def name_matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``: ``fnmatch``, or a full-match regex after ``re:``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _slot_specs(
    name: str, act: QuantSpec, weight: QuantSpec, overrides: Sequence[tuple[str, dict[str, Any] | None]]
) -> dict[str, QuantSpec | None] | None:
    """Specs of the three slots of layer ``name`` after the overrides; ``None`` keeps the layer float.

    A slot switched on by an override starts from the default recipe of its kind (the activation recipe for
    ``output``) plus the shared fields seen so far.
    """
    specs: dict[str, QuantSpec | None] = {"act": act, "weight": weight, "output": None}
    defaults = {"act": act, "weight": weight, "output": act}
    shared: dict[str, Any] = {}
    for pattern, override in overrides:
        if not name_matches(pattern, name):
            continue
        if override is None:
            return None
        where = f"override {pattern!r}"
        fields = {k: v for k, v in override.items() if k not in SLOTS}
        shared.update(fields)
        for slot in SLOTS:
            if fields and specs[slot] is not None:
                specs[slot] = specs[slot].updated(fields, where)
        for slot in SLOTS:
            if slot not in override:
                continue
            if override[slot] is None:
                specs[slot] = None
                continue
            base = specs[slot] or defaults[slot].updated(shared, where)
            specs[slot] = base.updated(dict(override[slot]), f"{where} [{slot}]")
    return specs


def quantize(
    model: nn.Module,
    act: QuantSpec,
    weight: QuantSpec,
    overrides: Sequence[tuple[str, dict[str, Any] | None]] = (),
    skip: Sequence[str] = (),
) -> nn.Module:
    """Swap ``model``'s Linear/Conv2d layers for quantized ones (in place) and return the model.

    Layers whose name matches a ``skip`` pattern stay float. A bare Linear/Conv2d ``model`` is returned
    as its quantized replacement (its name is the empty string).
    """
    for pattern, override in overrides:
        if override is not None and not isinstance(override, dict):
            raise TypeError(f"override {pattern!r}: expected a dict or None, got {type(override).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    replaced = model
    for name, module in targets:
        if any(name_matches(p, name) for p in skip):
            continue
        specs = _slot_specs(name, act, weight, overrides)
        if specs is None:
            continue
        prefix = f"{name}." if name else ""
        slots = {
            "input_quantizer": (specs["act"], Role.INPUT),
            "weight_quantizer": (specs["weight"], Role.WEIGHT),
            "output_quantizer": (specs["output"], Role.OUTPUT),
        }
        quantizers = {slot: None if spec is None else build_quantizer(spec, role, prefix + slot)
                      for slot, (spec, role) in slots.items()}
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
        new = cls.from_float(module, **quantizers)
        if not name:
            replaced = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return replaced


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """``(module path, quantizer)`` for every quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def set_mode(
    model: nn.Module, mode: Mode, drop_p: float = 0.0, generator: torch.Generator | None = None
) -> None:
    """Put every quantizer of ``model`` in ``mode``."""
    for _, q in iter_quantizers(model):
        q.set_mode(mode, drop_p, generator)


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Every quantizer observes (outputs stay float); on exit each one finalizes and returns to its mode.

    If the block raises, or some quantizer saw no data (all are named), nothing is finalized.
    """
    quantizers = [q for _, q in iter_quantizers(model)]
    previous = [(q.mode, q.drop_p) for q in quantizers]
    for q in quantizers:
        q.set_mode(Mode.CALIBRATE)
    try:
        yield model
    except BaseException:
        for q, (mode, drop_p) in zip(quantizers, previous):
            q.mode, q.drop_p = mode, drop_p
        raise
    unseen = [q.name for q in quantizers if q.observed_batches == 0]
    if unseen:
        for q, (mode, drop_p) in zip(quantizers, previous):
            q.mode, q.drop_p = mode, drop_p
        raise RuntimeError(f"{len(unseen)} quantizer(s) saw no data during calibration: {', '.join(unseen)}")
    for q in quantizers:
        q.finalize()
        q.mode = Mode.OFF
    for q, (mode, drop_p) in zip(quantizers, previous):
        q.set_mode(mode, drop_p)


@contextmanager
def _modes(quantizers: list[Quantizer], mode: Mode, drop_p: float = 0.0,
           generator: torch.Generator | None = None) -> Iterator[None]:
    previous = [(q.mode, q.drop_p, q.generator) for q in quantizers]
    try:
        for q in quantizers:
            q.set_mode(mode, drop_p, generator)
        yield
    finally:
        for q, (old_mode, old_p, old_gen) in zip(quantizers, previous):
            q.mode, q.drop_p, q.generator = old_mode, old_p, old_gen


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The original float model: every quantizer OFF and every layer on its float reference weight (the
    weight before an in-place transform such as ACNR); previous modes and weights come back on exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_modes([q for _, q in iter_quantizers(model)], Mode.OFF))
        for layer in model.modules():
            if isinstance(layer, QuantLayer):
                stack.enter_context(layer.float_reference())
        yield model


@contextmanager
def activations_quantized(model: nn.Module) -> Iterator[nn.Module]:
    """Every activation quantizer in QUANTIZE mode and every weight quantizer OFF (the current weights in
    float): the quantized activation chain that ACNR measures its error on; previous modes come back."""
    quantizers = [q for _, q in iter_quantizers(model)]
    with _modes([q for q in quantizers if q.role is Role.WEIGHT], Mode.OFF), \
            _modes([q for q in quantizers if q.role is not Role.WEIGHT], Mode.QUANTIZE):
        yield model


@contextmanager
def activations_off(model: nn.Module) -> Iterator[nn.Module]:
    """Every activation quantizer OFF, the weight quantizers as they are (BRECQ's reference
    reconstruction); previous modes come back on exit."""
    with _modes([q for _, q in iter_quantizers(model) if q.role is not Role.WEIGHT], Mode.OFF):
        yield model


@contextmanager
def dropping(model: nn.Module, p: float, generator: torch.Generator | None = None) -> Iterator[nn.Module]:
    """QDrop: every activation quantizer in QUANTIZE mode switches to DROP, an element staying float with
    probability ``p`` (masks from ``generator``); weights stay quantized. Previous modes come back on exit."""
    active = [q for _, q in iter_quantizers(model) if q.role is not Role.WEIGHT and q.mode is Mode.QUANTIZE]
    with _modes(active, Mode.DROP, p, generator):
        yield model


class NotFullyQuantizedError(AssertionError):
    """The model is not in its evaluation state; ``offenders`` lists ``(quantizer name, reason)``."""

    def __init__(self, offenders: list[tuple[str, str]]) -> None:
        self.offenders = offenders
        lines = "\n".join(f"  {name}: {reason}" for name, reason in offenders)
        super().__init__(f"{len(offenders)} quantizer(s) not fully quantized:\n{lines}")


def assert_fully_quantized(model: nn.Module) -> None:
    """Raise ``NotFullyQuantizedError`` unless every quantizer is in QUANTIZE mode (no QDrop dropping) and
    every AdaRound weight is hardened; a model without quantizers also fails."""
    offenders: list[tuple[str, str]] = []
    found = False
    for path, q in iter_quantizers(model):
        found = True
        label = q.name or path
        if q.mode is not Mode.QUANTIZE:
            offenders.append((label, f"mode is {q.mode.name}"))
        if q.drop_p > 0:
            offenders.append((label, f"dropping with p={q.drop_p}"))
        if isinstance(q, AdaRoundQuantizer) and bool(q.calibrated) and not q.is_hard:
            offenders.append((label, "AdaRound rounding is still soft (call harden())"))
    if not found:
        offenders.append(("<model>", "has no quantizers"))
    if offenders:
        raise NotFullyQuantizedError(offenders)
