"""``quantize_sam``: build every quantizer of a SAM from a ``QConfig`` and the SAM role map.

Precedence is the one resolver's (``ahcq.quantization.recipe``); the twins' slots are ``quant_recipe``'s.
Every quantized slot must be covered by the role map, so a segment_anything release that moves a layer fails
loudly, before anything is changed, instead of silently getting a default quantizer.
"""
from __future__ import annotations

from collections.abc import Iterable

from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.models.quant_recipe import fill_twin_slots, input_sites, skip_patterns
from ahcq.models.sam import DEFAULT_KEEP_FLOAT, float_patterns, is_kept_float, prepare_sam
from ahcq.models.sam_attention import ATTENTION_SLOTS, QuantDecoderAttention, QuantEncoderAttention
from ahcq.models.sam_roles import matching, sam_role_map
from ahcq.quantization import api
from ahcq.quantization.config import QConfig
from ahcq.quantization.recipe import check_allocation, quantize_layers, user_overrides

__all__ = ["DECODER_PATTERN", "quantize_sam"]

DECODER_PATTERN = "mask_decoder.*"
_TWINS = (QuantEncoderAttention, QuantDecoderAttention)
_ATTENTIONS = (sam_image_encoder.Attention, sam_transformer.Attention, *_TWINS)


def _check_scope(sam: Sam, patterns: tuple[str, ...], role_map: list, user_float: list[str]) -> None:
    """Refuse, before anything changes, a model that is already quantized or has slots the map misses."""
    first = next(api.iter_quantizers(sam), None)
    if first is not None:
        raise ValueError(f"quantize_sam needs a float SAM, but it already holds quantizer {first[0]!r}")
    for name, module in sam.named_modules():
        if is_kept_float(name, patterns) or any(api.name_matches(p, name) for p in user_float):
            continue
        if type(module) in (nn.Linear, nn.Conv2d) and not matching(role_map, name, "input"):
            raise ValueError(f"layer {name!r} would be quantized but is not covered by the SAM role map")
        if isinstance(module, _ATTENTIONS):
            for slot in ATTENTION_SLOTS:
                if not matching(role_map, name, slot):
                    raise ValueError(f"attention slot {name}.{slot} is not covered by the SAM role map")


def quantize_sam(
    sam: Sam, qconfig: QConfig, quant_encoder: bool = True, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT
) -> Sam:
    """Swap ``sam`` (in place) to its quantized form with every quantizer built but OFF; returns ``sam``.

    Calibrate next (``api.calibrating``), then switch the quantizers on (``api.set_mode``).
    """
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"quantize_sam expects a QConfig, got {type(qconfig).__name__}")
    if not isinstance(sam, Sam):
        raise TypeError(f"quantize_sam expects a segment_anything Sam, got {type(sam).__name__}")
    patterns = float_patterns(quant_encoder, keep_float)
    role_map = sam_role_map(qconfig)
    user = user_overrides(qconfig)
    check_allocation(sam, qconfig)
    _check_scope(sam, patterns, role_map, [pattern for pattern, override in user if override is None])
    prepare_sam(sam, quant_encoder, patterns)
    _, *recipes = quantize_layers(sam, qconfig, input_sites(role_map), skip_patterns(patterns),
                                  DECODER_PATTERN)
    twins = [(name, module) for name, module in sam.named_modules() if isinstance(module, _TWINS)]
    for _, twin in twins:
        if isinstance(twin, QuantEncoderAttention):
            twin.rel_pos_float_q = qconfig.attention.rel_pos_float_q
    fill_twin_slots(twins, tuple(recipes), DECODER_PATTERN, role_map, user, "SAM role map")
    return sam
