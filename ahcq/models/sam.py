"""Turn a segment_anything ``Sam`` into its quant-aware form, in place, keeping upstream module names.

``prepare_sam`` replaces every attention module that is to be quantized by its twin (``sam_attention``),
which shares the original Linear layers and parameters, so ``image_encoder.blocks.3.attn.qkv.weight`` stays
the same ``Parameter`` under the same name and official checkpoints keep loading. Linear/Conv layers are left
to the generic quantization API (``quantize_sam``), which swaps them for ``QuantLinear``/``QuantConv2d``.

What stays float follows the reference implementations (patch embedding, positional embeddings, prompt
encoder, output upscaling, hyper-network MLPs, IoU head, mask tokens) and is configurable through
``keep_float``: module-name patterns (``fnmatch`` syntax) that keep a module *and everything under it* float.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.models.sam_attention import QuantDecoderAttention, QuantEncoderAttention

__all__ = ["DEFAULT_KEEP_FLOAT", "float_patterns", "is_kept_float", "prepare_sam"]

DEFAULT_KEEP_FLOAT: tuple[str, ...] = (
    "image_encoder.patch_embed",
    "prompt_encoder",
    "mask_decoder.output_upscaling",
    "mask_decoder.output_hypernetworks_mlps",
    "mask_decoder.iou_prediction_head",
)


def float_patterns(
    quant_encoder: bool = True, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT
) -> tuple[str, ...]:
    """The keep-float patterns in effect: ``keep_float`` plus the whole encoder when it is not quantized."""
    if isinstance(keep_float, str):
        raise TypeError(f"keep_float must be a collection of patterns, not the string {keep_float!r}")
    patterns = tuple(keep_float)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"keep_float patterns must be non-empty strings, got {pattern!r}")
    return patterns if quant_encoder else (*patterns, "image_encoder")


def is_kept_float(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` or one of its ancestors matches a keep-float pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def prepare_sam(
    sam: Sam, quant_encoder: bool = True, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT
) -> Sam:
    """Swap, in place, each attention of ``sam`` that is not kept float for its quant-aware twin.

    Idempotent (twins are left alone). Returns ``sam``. The twins start with empty slots, so the model's
    outputs are bit-identical to upstream until quantizers are installed.
    """
    if not isinstance(sam, Sam):
        raise TypeError(f"prepare_sam expects a segment_anything Sam, got {type(sam).__name__}")
    patterns = float_patterns(quant_encoder, keep_float)
    swaps: list[tuple[str, nn.Module]] = []
    for name, module in sam.named_modules():
        if is_kept_float(name, patterns):
            continue
        if isinstance(module, sam_image_encoder.Attention):
            swaps.append((name, QuantEncoderAttention(module).train(module.training)))
        elif isinstance(module, sam_transformer.Attention):
            swaps.append((name, QuantDecoderAttention(module).train(module.training)))
    for name, twin in swaps:
        sam.set_submodule(name, twin)
    return sam
