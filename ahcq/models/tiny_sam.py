"""A small SAM assembled from segment_anything's own modules, as a trainable CPU testbed.

It keeps every structural feature of SAM ViT-B that quantization touches (windowed blocks with
padding, global blocks, decomposed rel-pos, the conv neck, the prompt encoder, the two-way
transformer and 4 mask tokens), so a checkpoint of it exercises the same quantization paths.
"""
from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from ahcq.models.sam_checkpoint import SamSpec, mismatch, read_state_dict, sam_from_spec


def _sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine table (1, grid, grid, dim), the MAE initialisation SAM's encoder started from.

    SAM's ViT zero-initialises pos_embed; trained from scratch that leaves the encoder without any
    notion of position for the first few hundred steps, and box-prompted training stalls there.
    """
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]
    row = torch.cat([pos.sin(), pos.cos()], 1)
    table = torch.cat([row[:, None].expand(grid, grid, -1), row[None].expand(grid, grid, -1)], -1)
    return table[None].float()


def build_tiny_sam(
    img_size: int = 128,
    patch_size: int = 8,
    embed_dim: int = 128,
    depth: int = 6,
    num_heads: int = 4,
    window_size: int = 6,
    global_attn_indexes: tuple[int, ...] | list[int] = (2, 5),
    out_chans: int = 128,
    decoder_depth: int = 2,
    decoder_heads: int = 4,
    decoder_mlp_dim: int = 512,
    iou_head_hidden_dim: int = 128,
    checkpoint: str | PathLike | None = None,
) -> Sam:
    """Build the small SAM (eval mode); with ``checkpoint``, load a plain state dict strictly.

    Defaults: 128-px input, 8-px patches -> 16x16 tokens, window 6 (so windowed blocks pad the
    grid to 18x18, like ViT-B's 64 -> 70), global attention in blocks 2 and 5.
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if any(not 0 <= i < depth for i in global_attn_indexes):
        raise ValueError(f"global_attn_indexes {list(global_attn_indexes)} out of range for depth {depth}")
    grid = img_size // patch_size
    sam = sam_from_spec(SamSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=tuple(global_attn_indexes),
        img_size=img_size,
        patch_size=patch_size,
        window_size=window_size,
        prompt_embed_dim=out_chans,
        decoder_depth=decoder_depth,
        decoder_mlp_dim=decoder_mlp_dim,
        decoder_num_heads=decoder_heads,
        iou_head_hidden_dim=iou_head_hidden_dim,
    ))
    with torch.no_grad():
        sam.image_encoder.pos_embed.copy_(_sincos_pos_embed(grid, embed_dim))
    if checkpoint is not None:
        state = read_state_dict(os.fspath(checkpoint))
        try:
            sam.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            name = os.path.basename(os.fspath(checkpoint))
            raise ValueError(f"checkpoint {name} is not a tiny SAM of these sizes: {mismatch(err)}") from None
    return sam


def sidecar_build_args(checkpoint: str | PathLike) -> dict[str, Any] | None:
    """The ``build_args`` recorded in the json sidecar next to a tiny-SAM checkpoint (as
    tools/train_tiny_sam.py writes it); ``None`` without a sidecar or without that entry."""
    sidecar = Path(checkpoint).with_suffix(".json")
    return json.loads(sidecar.read_text()).get("build_args") if sidecar.is_file() else None
