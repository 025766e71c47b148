"""Build SAM ViT-B/L/H from segment_anything's classes and load the official checkpoints.

The official files (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) are plain
state dicts saved with ``torch.save``. ``load_sam`` reads them with ``weights_only=True`` (no pickled code
runs), tells the variant from the tensors themselves and refuses a file that holds another variant before
building anything, so a wrong ``model_type`` costs milliseconds and says what the file really holds.

``build_sam`` takes size overrides (image size, widths, depths) so that tests can build small models with a
variant's real structure: window size, global-attention pattern, rel-pos and neck.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

__all__ = ["SAM_VARIANTS", "SamSpec", "build_sam", "infer_model_type", "load_sam", "read_state_dict",
           "sam_from_spec", "spec_of_sam"]


@dataclasses.dataclass(frozen=True)
class SamSpec:
    """Hyper-parameters of one SAM build (the official values are in ``SAM_VARIANTS``)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def _spec(model_type: str, size_overrides: Mapping[str, Any]) -> SamSpec:
    if model_type not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM model_type {model_type!r}; expected one of {sorted(SAM_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(SamSpec)}
    unknown = sorted(set(size_overrides) - fields)
    if unknown:
        raise TypeError(f"unknown SAM size override(s) {unknown}; allowed: {sorted(fields)}")
    overrides = dict(size_overrides)
    if "global_attn_indexes" in overrides:
        overrides["global_attn_indexes"] = tuple(overrides["global_attn_indexes"])
    return dataclasses.replace(SAM_VARIANTS[model_type], **overrides)


def build_sam(model_type: str, **size_overrides: Any) -> Sam:
    """A randomly initialised ``Sam`` of ``model_type`` in eval mode, built as segment_anything builds it."""
    return sam_from_spec(_spec(model_type, size_overrides))


def sam_from_spec(s: SamSpec) -> Sam:
    """A randomly initialised ``Sam`` with the sizes of ``s`` in eval mode, built as segment_anything does."""
    grid = s.img_size // s.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=s.depth,
            embed_dim=s.embed_dim,
            img_size=s.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=s.num_heads,
            patch_size=s.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=s.global_attn_indexes,
            window_size=s.window_size,
            out_chans=s.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=s.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(s.img_size, s.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=s.decoder_depth,
                embedding_dim=s.prompt_embed_dim,
                mlp_dim=s.decoder_mlp_dim,
                num_heads=s.decoder_num_heads,
            ),
            transformer_dim=s.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=s.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def spec_of_sam(sam: Sam) -> SamSpec:
    """The ``SamSpec`` that ``sam_from_spec`` rebuilds ``sam``'s architecture from (float or quantized)."""
    enc, dec = sam.image_encoder, sam.mask_decoder
    patch = enc.patch_embed.proj.weight
    layers = dec.transformer.layers
    return SamSpec(
        embed_dim=int(patch.shape[0]), depth=len(enc.blocks), num_heads=int(enc.blocks[0].attn.num_heads),
        global_attn_indexes=tuple(i for i, b in enumerate(enc.blocks) if b.window_size == 0),
        img_size=int(enc.img_size), patch_size=int(patch.shape[-1]),
        window_size=max(int(b.window_size) for b in enc.blocks),
        prompt_embed_dim=int(sam.prompt_encoder.embed_dim),
        decoder_depth=len(layers), decoder_mlp_dim=int(layers[0].mlp.lin1.weight.shape[0]),
        decoder_num_heads=int(layers[0].self_attn.num_heads),
        iou_head_hidden_dim=int(dec.iou_prediction_head.layers[0].weight.shape[0]),
    )


def _describe(embed_dim: int, depth: int) -> str:
    for name, spec in SAM_VARIANTS.items():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return f"a {name} model (embed_dim {embed_dim}, {depth} blocks)"
    return f"an unrecognised model (embed_dim {embed_dim}, {depth} blocks)"


def _encoder_size(state_dict: Mapping[str, Any], source: str) -> tuple[int, int]:
    weight = state_dict.get(_PATCH_KEY)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{source} is not a SAM state dict: no 4-D tensor under {_PATCH_KEY!r}")
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    return int(weight.shape[0]), (max(blocks) + 1 if blocks else 0)


def infer_model_type(state_dict: Mapping[str, Any], source: str = "state dict") -> str:
    """``vit_b``/``vit_l``/``vit_h`` from the patch-embedding width and the number of encoder blocks."""
    embed_dim, depth = _encoder_size(state_dict, source)
    for name, spec in SAM_VARIANTS.items():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return name
    raise ValueError(f"{source} holds {_describe(embed_dim, depth)}, which is none of {sorted(SAM_VARIANTS)}")


def _load_error(err: Exception) -> str:
    """The reason ``torch.load`` gave, without its advice to load with ``weights_only=False`` (which would
    run whatever code the file carries)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "weights_only" in str(err):
        return "it holds Python objects other than tensors (only plain state dicts of tensors are read)"
    return f"{type(err).__name__}: {first[:200]}"


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``path`` (``weights_only``); ``FileNotFoundError`` or a
    one-line ``ValueError`` naming the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    name = os.path.basename(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # a malformed pickle can fail with almost any exception type
        raise ValueError(f"checkpoint {name} could not be read as a torch state dict: {_load_error(err)}") \
            from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"checkpoint {name} is not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {name} is not a plain state dict: non-tensor entry {bad[0]!r}")
    return dict(obj)


def load_sam(model_type: str | None, checkpoint: str | os.PathLike, **size_overrides: Any) -> Sam:
    """Build ``model_type`` (``None``: infer it from the file) and strictly load ``checkpoint`` into it.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a SAM state
    dict, holds another variant than requested, or whose keys/shapes do not match the built model.
    """
    if model_type is not None:
        _spec(model_type, size_overrides)
    path = os.fspath(checkpoint)
    name = os.path.basename(path)
    state_dict = read_state_dict(path)
    found = _encoder_size(state_dict, f"checkpoint {name}")
    if model_type is None:
        model_type = infer_model_type(state_dict, f"checkpoint {name}")
    spec = _spec(model_type, size_overrides)
    if found != (spec.embed_dim, spec.depth):
        wanted = model_type if not size_overrides else f"{model_type} with overrides {size_overrides}"
        raise ValueError(
            f"checkpoint {name} holds {_describe(*found)} but model_type {wanted} was requested "
            f"(embed_dim {spec.embed_dim}, {spec.depth} blocks)"
        )
    sam = build_sam(model_type, **size_overrides)
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {name} does not match a {model_type} SAM: {mismatch(err)}") from None
    return sam


def mismatch(err: RuntimeError) -> str:
    """``load_state_dict``'s complaint, cut to its first line and a few hundred characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + " ..."
