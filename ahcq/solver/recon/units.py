"""Reconstruction units: which module is trained, how it is called, which output is compared.

A unit's inputs are stored as ``Inputs = (args, kwargs)``, exactly what its ``forward`` received during the
float capture pass, so any signature works (one tensor, a ``(q, k, v)`` tuple, keyword side inputs).
``feed`` builds a unit's *quantized* inputs from the previous unit's quantized output and this unit's own
float inputs (side inputs such as positional encodings stay float); the default replaces the leading
positional arguments by the previous output, which is right whenever one unit's output is the next unit's
input. The capture pass checks that claim on the float data and asks for an explicit ``feed`` otherwise.
Code between two units (a residual add, a norm, a quantizer that belongs to no unit) belongs in ``feed``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ahcq.quantization.api import iter_quantizers
from ahcq.quantization.quantizers import AdaRoundQuantizer, Quantizer

__all__ = [
    "Inputs",
    "ReconUnit",
    "adaround_quantizers",
    "chain_feed",
    "default_call",
    "map_tensors",
    "scale_parameters",
    "tensor_leaves",
    "units_from_names",
]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts; other leaves are kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value``, in traversal order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


def default_call(module: nn.Module, inputs: Inputs) -> Any:
    """``module(*args, **kwargs)``."""
    args, kwargs = inputs
    return module(*args, **kwargs)


def chain_feed(prev_output: Any, own_inputs: Inputs) -> Inputs:
    """The previous output (a tensor, or a tuple of them) replaces the leading positional arguments."""
    args, kwargs = own_inputs
    outputs = prev_output if isinstance(prev_output, tuple) else (prev_output,)
    if len(outputs) > len(args):
        raise ValueError(f"chain_feed: {len(outputs)} outputs but only {len(args)} positional inputs")
    return (*outputs, *args[len(outputs):]), kwargs


@dataclass
class ReconUnit:
    """One reconstruction unit.

    ``output``: index of the compared output when the module returns a tuple (a tuple of indices compares
    several, their losses add up), ``None`` when it returns one tensor. ``feature_axis``: the axis summed in
    the loss (channels; ``1`` for NCHW convolution outputs). ``call`` runs the module on stored inputs;
    ``feed`` makes this unit's quantized inputs from the previous unit's quantized output (see module doc).
    ``iters`` overrides the run's iteration count for this unit (SAQ-SAM trains its last unit longer).
    ``weights``: one loss weight per compared output (default 1 each; SAQ-SAM's prompt-aware decoder loss).
    """

    name: str
    module: nn.Module
    output: int | tuple[int, ...] | None = None
    feature_axis: int = -1
    call: Callable[[nn.Module, Inputs], Any] = default_call
    feed: Callable[[Any, Inputs], Inputs] = chain_feed
    iters: int | None = None
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            kind = type(self.module).__name__
            raise TypeError(f"unit {self.name!r}: module must be an nn.Module, got {kind}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"unit {self.name!r}: iters must be >= 1, got {self.iters}")
        compared = 1 if not isinstance(self.output, tuple) else len(self.output)
        if self.weights is not None and len(self.weights) != compared:
            raise ValueError(f"unit {self.name!r}: {len(self.weights)} loss weights for {compared} compared "
                             f"outputs")

    @property
    def label(self) -> str:
        """Name plus its own iteration count and loss weights, if any: what a saved state must match."""
        label = self.name if self.iters is None else f"{self.name} (iters={self.iters})"
        return label if self.weights is None else f"{label} (weights={list(self.weights)})"

    @property
    def quantizers(self) -> list[Quantizer]:
        """The quantizers inside the unit's module (looked up now, so units may be made before quantizing)."""
        return [q for _, q in iter_quantizers(self.module)]

    def select(self, output: Any) -> list[torch.Tensor]:
        """The compared output tensors."""
        if self.output is None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"unit {self.name!r} returned {type(output).__name__}; set ReconUnit.output "
                                f"to the index of the compared output")
            return [output]
        indices = self.output if isinstance(self.output, tuple) else (self.output,)
        return [output[i] for i in indices]


def units_from_names(model: nn.Module, names: Sequence[str], **options: Any) -> list[ReconUnit]:
    """Units for the named submodules of ``model``, given in forward order; ``options`` go to every unit."""
    if not names:
        raise ValueError("units_from_names: no module names given")
    if len(set(names)) != len(names):
        raise ValueError(f"units_from_names: duplicate module names in {list(names)}")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"units_from_names: no submodule named {missing}")
    units = [ReconUnit(n, modules[n], **options) for n in names]
    seen: dict[int, str] = {}
    for unit in units:
        for q in unit.quantizers:
            if id(q) in seen:
                raise ValueError(f"quantizer {q.name!r} is in both unit {seen[id(q)]!r} and {unit.name!r}")
            seen[id(q)] = unit.name
    return units


def adaround_quantizers(unit: ReconUnit) -> list[AdaRoundQuantizer]:
    """The AdaRound weight quantizers of ``unit``."""
    return [q for q in unit.quantizers if isinstance(q, AdaRoundQuantizer)]


def scale_parameters(unit: ReconUnit) -> list[nn.Parameter]:
    """Learnable quantizer parameters other than AdaRound's rounding logits (LSQ, CAG, HLUQ, AGQ scales)."""
    params: list[nn.Parameter] = []
    for q in unit.quantizers:
        if isinstance(q, AdaRoundQuantizer):
            continue
        params.extend(p for p in q.parameters(recurse=False) if p.requires_grad)
    return params
