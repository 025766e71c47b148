"""How the wrapper gets its SAM, chosen by ``sam=dict(type=...)``: official weights, tiny demo, random; and
SAM 2.1 as an image model (official weights, or the tiny testbed trained on video clips)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sam2.modeling.sam2_base import SAM2Base
from segment_anything.modeling import Sam

from ahcq.models.sam2_checkpoint import load_sam2, run_overrides
from ahcq.models.sam_checkpoint import build_sam, load_sam
from ahcq.models.tiny_sam import build_tiny_sam, sidecar_build_args

from .registry import SAM_BUILDERS

__all__ = ["OfficialSAM", "OfficialSAM2", "RandomSAM", "TinySAM", "TinySAM2"]


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


@SAM_BUILDERS.register_module()
def OfficialSAM2(model_type: str, checkpoint: str | os.PathLike) -> SAM2Base:  # noqa: N802
    """SAM 2.1 (``t``, ``s``, ``b+``, ``l`` or a sam2 config name) with an official checkpoint, as the image
    model ``SAM2ImagePredictor`` wraps (trunk checked against the file)."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"sam.checkpoint: no such SAM2 weights {os.fspath(checkpoint)!r}")
    return load_sam2(model_type, checkpoint)


@SAM_BUILDERS.register_module()
def TinySAM2(checkpoint: str | os.PathLike) -> SAM2Base:  # noqa: N802
    """The tiny SAM 2.1 testbed (tools/train_tiny_sam2.py) as an image model: its sam2 config and reduced
    sizes are the ``model`` section recorded in the checkpoint's json sidecar."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"sam.checkpoint: no such tiny SAM2 weights {os.fspath(checkpoint)!r}")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"sam.checkpoint: {path.name} has no json sidecar {sidecar.name} recording "
                                "the sizes it was trained with (tools/train_tiny_sam2.py writes it)")
    model = json.loads(sidecar.read_text()).get("model") or {}
    if "config" not in model:
        raise ValueError(f"sam.checkpoint: sidecar {sidecar.name} has no model.config")
    return load_sam2(model["config"], path, run_overrides(model, video=False))
