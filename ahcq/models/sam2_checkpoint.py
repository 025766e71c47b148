"""Build SAM 2.1 (Hiera T/S/B+/L) through sam2's own hydra configs and load checkpoints in its format.

sam2's checkpoints are ``torch.save({"model": state_dict})``. ``load_sam2`` reads them with
``weights_only=True``, infers the Hiera trunk (embed dim, blocks per stage) from the tensor shapes and
refuses a file of another size before building anything, naming what was expected and what was found.
Builds are always on the CPU; hydra overrides (``reduced_overrides`` for small test builds) pass through
to sam2's builders, so reduced models keep each size's real structure (stages, windows, global blocks).
"""
from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from hydra import compose
from sam2.build_sam import build_sam2, build_sam2_video_predictor
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.sam2_base import SAM2Base

__all__ = [
    "SAM2_CONFIGS",
    "SAM2_TRUNKS",
    "TrunkShape",
    "build_sam2_model",
    "config_trunk",
    "infer_sam2_size",
    "infer_trunk",
    "load_sam2",
    "reduced_overrides",
    "resolve_config",
    "run_overrides",
]

SAM2_CONFIGS: dict[str, str] = {
    "t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
NO_FILL_HOLES = "++model.fill_hole_area=0"  # the hole filling needs sam2's CUDA extension: off everywhere
_ALIASES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


class TrunkShape(NamedTuple):
    """What tells the Hiera sizes apart: the first stage's width and the number of blocks per stage."""

    embed_dim: int
    stages: tuple[int, ...]

    def __str__(self) -> str:
        return f"embed_dim {self.embed_dim}, stages {list(self.stages)}"


SAM2_TRUNKS: dict[str, TrunkShape] = {
    "t": TrunkShape(96, (1, 2, 7, 2)),
    "s": TrunkShape(96, (1, 2, 11, 2)),
    "b+": TrunkShape(112, (2, 3, 16, 3)),
    "l": TrunkShape(144, (2, 6, 36, 4)),
}

_TRUNK = "image_encoder.trunk"
_PATCH_KEY = f"{_TRUNK}.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(rf"^{re.escape(_TRUNK)}\.blocks\.(\d+)\.")
_STAGE_PROJ_KEY = re.compile(rf"^{re.escape(_TRUNK)}\.blocks\.(\d+)\.proj\.weight$")


def resolve_config(config_name_or_size: str) -> str:
    """A size (``t``, ``s``, ``b+``, ``l`` or ``tiny``/``small``/``base_plus``/``large``) or a config name."""
    key = _ALIASES.get(config_name_or_size, config_name_or_size)
    if key in SAM2_CONFIGS:
        return SAM2_CONFIGS[key]
    if isinstance(config_name_or_size, str) and config_name_or_size.endswith(".yaml"):
        return config_name_or_size
    raise ValueError(f"unknown SAM2 size or config {config_name_or_size!r}; expected one of "
                     f"{sorted(SAM2_CONFIGS) + sorted(_ALIASES)} or a sam2 config name ending in .yaml")


def reduced_overrides(
    image_size: int = 128, embed_dim: int = 16, d_model: int = 32, mem_dim: int = 16, ffn_dim: int = 64
) -> list[str]:
    """Hydra overrides for a small build of any size: fewer pixels and channels, same structure.

    The trunk keeps its stages, heads, windows and global blocks; the neck, memory attention, memory
    encoder and mask decoder keep their layer counts but run at ``d_model`` (a multiple of 16: the decoder
    has 8 heads and halves its attention width) with ``mem_dim`` memory channels.
    """
    if d_model % 16 or image_size % 32:
        raise ValueError(f"reduced_overrides: d_model must be a multiple of 16 and image_size of 32, "
                         f"got d_model={d_model}, image_size={image_size}")
    channels = [embed_dim * 8, embed_dim * 4, embed_dim * 2, embed_dim]
    mem_attn = "++model.memory_attention"
    mem_enc = "++model.memory_encoder"
    return [
        f"++model.image_size={image_size}",
        f"++model.image_encoder.trunk.embed_dim={embed_dim}",
        f"++model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, channels))}]",
        f"++model.image_encoder.neck.d_model={d_model}",
        f"++model.image_encoder.neck.position_encoding.num_pos_feats={d_model}",
        f"{mem_attn}.d_model={d_model}",
        f"{mem_attn}.layer.d_model={d_model}",
        f"{mem_attn}.layer.dim_feedforward={ffn_dim}",
        f"{mem_attn}.layer.self_attention.embedding_dim={d_model}",
        f"{mem_attn}.layer.cross_attention.embedding_dim={d_model}",
        f"{mem_attn}.layer.cross_attention.kv_in_dim={mem_dim}",
        f"{mem_enc}.out_dim={mem_dim}",
        f"{mem_enc}.in_dim={d_model}",
        f"{mem_enc}.mask_downsampler.embed_dim={d_model}",
        f"{mem_enc}.fuser.layer.dim={d_model}",
        f"{mem_enc}.position_encoding.num_pos_feats={mem_dim}",
    ]


def run_overrides(model: Mapping[str, Any], video: bool = True) -> list[str]:
    """The hydra overrides of a video-run config's ``model`` section (``reduced``, ``overrides``), plus, for
    the video predictor, the CPU-safe hole filling; training and evaluation both build from this, so they
    build the same model."""
    reduced = model.get("reduced") or {}
    built = [*(reduced_overrides(**reduced) if reduced else []), *model.get("overrides", [])]
    return [*built, NO_FILL_HOLES] if video else built


def build_sam2_model(
    config_name_or_size: str,
    overrides: Sequence[str] = (),
    video: bool = False,
    apply_postprocessing: bool = True,
) -> SAM2Base:
    """A randomly initialised SAM2 (``SAM2VideoPredictor`` when ``video``) on the CPU, in eval mode."""
    config = resolve_config(config_name_or_size)
    builder = build_sam2_video_predictor if video else build_sam2
    return builder(config, None, device="cpu", hydra_overrides_extra=list(overrides),
                   apply_postprocessing=apply_postprocessing)


def config_trunk(config_name_or_size: str, overrides: Sequence[str] = ()) -> TrunkShape:
    """The trunk a config (plus overrides) builds, read from the composed config without building it."""
    cfg = compose(config_name=resolve_config(config_name_or_size), overrides=list(overrides))
    trunk = cfg.model.image_encoder.trunk
    defaults = inspect.signature(Hiera.__init__).parameters
    embed_dim = trunk.get("embed_dim", defaults["embed_dim"].default)
    stages = trunk.get("stages", defaults["stages"].default)
    return TrunkShape(int(embed_dim), tuple(int(s) for s in stages))


def infer_trunk(state_dict: Mapping[str, Any], source: str = "state dict") -> TrunkShape:
    """Trunk shape from the tensors: patch-embedding width, block count and the stage-change projections.

    Only tensor shapes are read, so meta tensors work too.
    """
    weight = state_dict.get(_PATCH_KEY)
    if weight is None or len(weight.shape) != 4:
        raise ValueError(f"{source} is not a SAM2 state dict: no 4-D tensor under {_PATCH_KEY!r}")
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    if not blocks:
        raise ValueError(f"{source} is not a SAM2 state dict: no {_TRUNK}.blocks.* entries")
    depth = max(blocks) + 1
    starts = sorted(int(m.group(1)) for key in state_dict if (m := _STAGE_PROJ_KEY.match(key)))
    bounds = [0, *starts, depth]
    return TrunkShape(int(weight.shape[0]), tuple(b - a for a, b in zip(bounds, bounds[1:])))


def _describe(trunk: TrunkShape) -> str:
    sizes = [size for size, known in SAM2_TRUNKS.items() if known == trunk]
    return f"a Hiera-{sizes[0]} trunk ({trunk})" if sizes else f"an unrecognised Hiera trunk ({trunk})"


def infer_sam2_size(state_dict: Mapping[str, Any], source: str = "state dict") -> str:
    """``t``/``s``/``b+``/``l`` of a full-size SAM 2.1 state dict."""
    trunk = infer_trunk(state_dict, source)
    for size, known in SAM2_TRUNKS.items():
        if known == trunk:
            return size
    raise ValueError(f"{source} holds {_describe(trunk)}, which is none of the SAM 2.1 sizes "
                     f"{list(SAM2_TRUNKS)}")


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {name} could not be read as a torch file: {err}") from err
    if not isinstance(obj, Mapping) or "model" not in obj:
        found = sorted(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"checkpoint {name} is not in sam2's format {{'model': state_dict}} (found {found})")
    state_dict = obj["model"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"checkpoint {name}: 'model' is not a state dict of named tensors")
    return dict(state_dict)


def load_sam2(
    config_name_or_size: str,
    checkpoint: str | os.PathLike,
    overrides: Sequence[str] = (),
    video: bool = False,
    apply_postprocessing: bool = True,
) -> SAM2Base:
    """Build ``config_name_or_size`` (plus hydra ``overrides``) and strictly load ``checkpoint`` into it.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not in sam2's
    format, holds another trunk than the config builds (checked before building), or whose keys/shapes do
    not match the built model.
    """
    path = os.fspath(checkpoint)
    name = os.path.basename(path)
    state_dict = _read_checkpoint(path)
    found = infer_trunk(state_dict, f"checkpoint {name}")
    expected = config_trunk(config_name_or_size, overrides)
    if found != expected:
        raise ValueError(f"checkpoint {name} holds {_describe(found)} but config {config_name_or_size!r} "
                         f"builds {_describe(expected)}")
    model = build_sam2_model(config_name_or_size, overrides, video, apply_postprocessing)
    problems = _mismatches(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"checkpoint {name} does not match config {config_name_or_size!r}: {problems}")
    model.load_state_dict(state_dict, strict=True)
    return model


def _mismatches(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], shown: int = 3
) -> str:
    """A short account of missing keys, unexpected keys and shape mismatches ('' when there are none)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k].shape)} (model {list(v.shape)})"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    parts = [f"{len(items)} {what}: {', '.join(items[:shown])}{', ...' if len(items) > shown else ''}"
             for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if items]
    return "; ".join(parts)
