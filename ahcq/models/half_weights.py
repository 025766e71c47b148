"""Rounding a model's float weights to float16 values, kept in float32: what a float16 checkpoint holds.

The quantization config's ``float16_weights`` runs a recipe on such a model, so the layers the recipe keeps
float (and every bias, norm and embedding) pack losslessly in two bytes (``ahcq.deploy.packed``) while the
packed file still reproduces the run's masks bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from ahcq.quantization.config import QConfig

__all__ = ["prepare_weights", "round_weights_float16"]


@torch.no_grad()
def round_weights_float16(model: nn.Module) -> int:
    """Round every float32 entry of ``model``'s state dict (what a checkpoint holds; constants such as SAM's
    non-persistent pixel statistics stay) to the nearest float16 value, in place; the number of tensors
    rounded. A value beyond float16's range is refused rather than turned into inf."""
    limit = torch.finfo(torch.float16).max
    rounded = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if t.dtype != torch.float32:
            continue
        if bool((t.abs() > limit).any()):
            raise ValueError(f"float16_weights: {name} holds values beyond float16's range (|x| > {limit:g})")
        t.copy_(t.half().float())
        rounded += 1
    return rounded


def prepare_weights(model: nn.Module, qconfig: QConfig | None) -> None:
    """Give the built float ``model`` the weights ``qconfig`` runs on (float16 values under
    ``float16_weights``), before anything is computed with it: caches, the float row and the float teacher
    all see the same weights."""
    if qconfig is not None and qconfig.float16_weights:
        round_weights_float16(model)
