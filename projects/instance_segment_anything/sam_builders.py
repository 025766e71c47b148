"""How the wrapper gets its SAM, chosen by ``sam=dict(type=...)``: official weights, tiny demo, random."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from ahcq.models.sam_checkpoint import build_sam, load_sam
from ahcq.models.tiny_sam import build_tiny_sam, sidecar_build_args

from .registry import SAM_BUILDERS

__all__ = ["OfficialSAM", "RandomSAM", "TinySAM"]


@SAM_BUILDERS.register_module()
def OfficialSAM(model_type: str, checkpoint: str | os.PathLike) -> Sam:  # noqa: N802 (config type name)
    """SAM ViT-B/L/H with an official checkpoint (``model_type`` checked against the file)."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"sam.checkpoint: no such SAM weights {os.fspath(checkpoint)!r}")
    return load_sam(model_type, checkpoint)


@SAM_BUILDERS.register_module()
def TinySAM(checkpoint: str | os.PathLike | None = None, **sizes: Any) -> Sam:  # noqa: N802
    """The small demo SAM; ``checkpoint=None`` leaves it randomly initialised.

    The sizes it was trained with are read from the checkpoint's json sidecar (``build_args``, written by
    tools/train_tiny_sam.py) when there is one; ``sizes`` given here take precedence.
    """
    if checkpoint is None:
        return build_tiny_sam(**sizes)
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"sam.checkpoint: no such tiny SAM weights {os.fspath(checkpoint)!r}")
    return build_tiny_sam(checkpoint=path, **{**(sidecar_build_args(path) or {}), **sizes})


@SAM_BUILDERS.register_module()
def RandomSAM(model_type: str = "vit_b", **size_overrides: Any) -> Sam:  # noqa: N802
    """A random SAM with ``model_type``'s structure, optionally shrunk (smoke runs without weights)."""
    return build_sam(model_type, **size_overrides)
