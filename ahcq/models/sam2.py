"""Turn a sam2 ``SAM2Base`` (image model or video predictor) into its quant-aware form, in place.

``prepare_sam2`` swaps every attention that is not kept float for its twin (``sam2_attention``), which
shares the original Linear layers, so module and parameter names stay those of upstream and official
checkpoints keep loading. ``quantize_sam2`` then builds every quantizer from a ``QConfig`` and the SAM2 role
map (``sam2_roles``): Linear/Conv layers through the generic ``api.quantize``, the twins' q/k/v/prob slots
here. All quantizers start OFF; calibrate with ``api.calibrating`` and switch them on with ``api.set_mode``.

Precedence is the one resolver's (``ahcq.quantization.recipe``); the twins' slots are ``quant_recipe``'s.
Every quantized slot must be covered by the role map, so a sam2 release that moves a layer fails loudly
instead of silently getting a default quantizer. What stays float (``DEFAULT_KEEP_FLOAT``) follows AHCQ-SAM's
SAM2 recipe: patch embedding, prompt encoder, mask-decoder output heads and object-pointer projections.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sam2.modeling.sam2_base import SAM2Base
from torch import nn

from ahcq.models.quant_recipe import fill_twin_slots, input_sites, skip_patterns
from ahcq.models.sam import float_patterns, is_kept_float
from ahcq.models.sam2_attention import SAM2_TWIN_TYPES, make_twin
from ahcq.models.sam2_roles import matching, sam2_role_map
from ahcq.quantization.config import QConfig
from ahcq.quantization.layers import QuantLayer
from ahcq.quantization.recipe import check_allocation, quantize_layers, user_overrides

__all__ = ["DECODER_PATTERN", "DEFAULT_KEEP_FLOAT", "attention_twins", "prepare_sam2", "quantize_sam2"]

DEFAULT_KEEP_FLOAT: tuple[str, ...] = (
    "image_encoder.trunk.patch_embed",
    "sam_prompt_encoder",
    "mask_downsample",
    "sam_mask_decoder.output_upscaling",
    "sam_mask_decoder.conv_s0",
    "sam_mask_decoder.conv_s1",
    "sam_mask_decoder.output_hypernetworks_mlps",
    "sam_mask_decoder.iou_prediction_head",
    "sam_mask_decoder.pred_obj_score_head",
    "obj_ptr_proj",
    "obj_ptr_tpos_proj",
)
DECODER_PATTERN = "sam_mask_decoder.*"


def _check_model(model: Any, caller: str) -> None:
    if not isinstance(model, SAM2Base):
        raise TypeError(f"{caller} expects a sam2 SAM2Base (build_sam2 / build_sam2_video_predictor), "
                        f"got {type(model).__name__}")


def prepare_sam2(model: SAM2Base, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT) -> SAM2Base:
    """Swap, in place, each attention of ``model`` outside ``keep_float`` for its quant-aware twin.

    ``keep_float`` holds ``fnmatch`` patterns that keep a module and everything under it float (e.g.
    ``"memory_attention"``). Idempotent; returns ``model``.
    """
    _check_model(model, "prepare_sam2")
    patterns = float_patterns(True, keep_float)
    swaps: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and not is_kept_float(name, patterns):
            twin = make_twin(module)
            if twin is not None:
                swaps.append((name, twin))
    for name, twin in swaps:
        model.set_submodule(name, twin)
    return model


def attention_twins(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, twin)`` of every attention twin in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SAM2_TWIN_TYPES)]


def quantize_sam2(
    model: SAM2Base, qconfig: QConfig, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT
) -> SAM2Base:
    """Swap ``model`` (in place) to its quantized form with every quantizer built but OFF; returns it."""
    _check_model(model, "quantize_sam2")
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"quantize_sam2 expects a QConfig, got {type(qconfig).__name__}")
    check_allocation(model, qconfig)
    patterns = float_patterns(True, keep_float)
    prepare_sam2(model, patterns)
    role_map = sam2_role_map(qconfig)
    user = user_overrides(qconfig)
    _, *recipes = quantize_layers(model, qconfig, input_sites(role_map), skip_patterns(patterns),
                                  DECODER_PATTERN)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLayer) and module.input_quantizer is not None:
            if not matching(role_map, name, "input"):
                raise RuntimeError(f"quantized layer {name!r} is not covered by the SAM2 role map; "
                                   "keep it float (keep_float) or add a role-map row")
    fill_twin_slots(attention_twins(model), tuple(recipes), DECODER_PATTERN, role_map, user,
                    "SAM2 role map")
    return model
