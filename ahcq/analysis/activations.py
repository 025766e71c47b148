"""Activations of a SAM at named quantizer slots, and the per-channel statistics the analysis figures show.

A forward hook on a quantizer sees exactly the tensor that slot quantizes, plus its side inputs (``value=``,
``next_layer=``), so capture never re-derives where a slot sits in the model: the SAM role map and
``quantize_sam`` decide that. Quantizers left OFF pass their input through, so the captured tensors are the
float model's activations.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ahcq.quantization.api import iter_quantizers
from ahcq.quantization.observers import make_observer
from ahcq.quantization.primitives import qrange
from ahcq.quantization.quantizers import Quantizer

__all__ = [
    "capture",
    "channel_ranges",
    "code_levels",
    "find_quantizers",
    "pairwise_param_cosine",
    "per_sample_qparams",
]


def find_quantizers(model: nn.Module, names: Iterable[str], family: type[Quantizer]) -> dict[str, Quantizer]:
    """The quantizers called ``names``; a missing slot or another family raises, naming both."""
    by_name = dict(iter_quantizers(model))
    found: dict[str, Quantizer] = {}
    for name in names:
        if name not in by_name:
            raise KeyError(f"no quantizer named {name!r} in the quantized model")
        q = by_name[name]
        if not isinstance(q, family):
            raise ValueError(f"quantizer {name!r} is {q.family}, not {family.family}; "
                             f"use a q_config that enables {family.family} there")
        found[name] = q
    return found


def code_levels(q: Quantizer) -> np.ndarray:
    """The value of every code ``0 .. 2**bits - 1`` of a calibrated quantizer, decoded by the quantizer."""
    return q.dequantize_int(torch.arange(2**q.bits, dtype=torch.int32)).cpu().numpy()


def capture(
    model: nn.Module,
    names: Sequence[str],
    samples: Sequence[Any],
    forward: Callable[[Any], None],
    twins: dict[str, Quantizer] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per slot, one ``[rows, channels]`` float tensor per sample (the slot's inputs, last axis kept).

    ``twins`` maps a slot to another quantizer that is called with the same input and side inputs, so a
    comparison quantizer calibrates on exactly what the slot's own quantizer sees.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in the model")
    twins = twins or {}
    calls: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str) -> Callable:
        def record(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            x = args[0].detach()
            calls[name].append(x.reshape(-1, x.shape[-1]).float().cpu())
            if name in twins:
                twins[name](x, **kwargs)
        return record

    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for sample in samples:
                forward(sample)
                for name in names:
                    if not calls[name]:
                        raise RuntimeError(f"slot {name!r} was not reached by the forward pass")
                    out[name].append(torch.cat(calls[name]))
                    calls[name].clear()
    finally:
        for handle in handles:
            handle.remove()
    return out


def channel_ranges(per_sample: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` over every sample's rows."""
    return torch.aminmax(torch.cat(list(per_sample)), dim=0)


def per_sample_qparams(
    per_sample: Sequence[torch.Tensor], bits: int, symmetric: bool = False, observer: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)``, each ``[samples, channels]``: each sample's own per-channel optimum.

    One fresh observer per sample, so every row is what calibrating on that sample alone would choose.
    """
    scales, zero_points = [], []
    for i, x in enumerate(per_sample):
        obs = make_observer(observer, bits=bits, symmetric=symmetric, axis=-1, name=f"sample {i}")
        obs.observe(x)
        scale, zero_point = obs.qparams()
        scales.append(scale)
        zero_points.append(zero_point)
    return torch.stack(scales), torch.stack(zero_points)


def pairwise_param_cosine(
    scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool = False
) -> np.ndarray:
    """Cosine similarity of every pair of samples' ``(scale, zero point)``, per channel: ``[C, pairs]``.

    The two components are made unit-free and of comparable size first: each channel's scale is divided by
    its largest value over the samples and the zero point is mapped to ``[0, 1]`` by the code range.
    Without that the integer zero point would dominate whenever scales are much smaller than one.
    """
    samples = scale.shape[0]
    if samples < 2:
        raise ValueError(f"comparing parameters across samples needs at least 2 samples, got {samples}")
    qmin, qmax = qrange(bits, symmetric)
    s = scale.double().numpy()
    z = zero_point.double().numpy()
    feats = np.stack([s / s.max(axis=0, keepdims=True), (z - qmin) / (qmax - qmin)], axis=-1)
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    pairs = list(itertools.combinations(range(samples), 2))
    return np.stack([(unit[i] * unit[j]).sum(-1) for i, j in pairs], axis=1)
