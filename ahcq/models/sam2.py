"""Turn a sam2 ``SAM2Base`` (image model or video predictor) into its quant-aware form, in place.

``prepare_sam2`` swaps every attention that is not kept float for its twin (``sam2_attention``), which
shares the original Linear layers, so module and parameter names stay those of upstream and official
checkpoints keep loading. ``quantize_sam2`` then builds every quantizer from a ``QConfig`` and the SAM2 role
map (``sam2_roles``): Linear/Conv layers through the generic ``api.quantize``, the twins' q/k/v/prob slots
here. All quantizers start OFF; calibrate with ``api.calibrating`` and switch them on with ``api.set_mode``.

Precedence for an activation slot (later wins): ``a_qconfig`` (``decoder_a_qconfig`` under the mask
decoder when a config splits them), the role map, then the config's ``overrides``. Every quantized slot must
be covered by the role map, so a sam2 release that moves a layer fails loudly instead of silently getting a
default quantizer. What stays float (``DEFAULT_KEEP_FLOAT``) follows AHCQ-SAM's SAM2 recipe: patch
embedding, prompt encoder, mask-decoder output heads and object-pointer projections.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import Any

from sam2.modeling.sam2_base import SAM2Base
from torch import nn

from ahcq.models.sam import float_patterns, is_kept_float
from ahcq.models.sam2_attention import SAM2_TWIN_TYPES, make_twin
from ahcq.models.sam2_roles import matching, sam2_role_map
from ahcq.models.sam_attention import ATTENTION_SLOTS, EmptySlot
from ahcq.quantization import api
from ahcq.quantization.config import QConfig, QSpecConfig
from ahcq.quantization.layers import QuantConv2d, QuantLinear

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


def _spec_fields(spec: QSpecConfig | dict[str, Any]) -> dict[str, Any]:
    """YAML recipe keys -> ``QuantSpec`` fields (``bit`` -> ``bits``; unset keys dropped)."""
    items = dataclasses.asdict(spec) if isinstance(spec, QSpecConfig) else dict(spec)
    return {("bits" if k == "bit" else k): v for k, v in items.items() if v is not None}


def _user_overrides(qconfig: QConfig) -> list[tuple[str, dict[str, Any] | None]]:
    out: list[tuple[str, dict[str, Any] | None]] = []
    for o in qconfig.overrides:
        partial = {slot: _spec_fields(dict(items)) for slot, items in (("act", o.act), ("weight", o.weight))
                   if items}
        out.append((o.pattern, None if o.keep_float else partial))
    return out


def _decoder_split(qconfig: QConfig) -> dict[str, dict[str, Any]]:
    """SAQ-SAM's separate decoder recipes, where they differ from the default ones."""
    split = {"act": (qconfig.decoder_a_qconfig, qconfig.a_qconfig),
             "weight": (qconfig.decoder_w_qconfig, qconfig.w_qconfig)}
    return {slot: _spec_fields(dec) for slot, (dec, default) in split.items()
            if dec is not None and dec != default}


def _slot_quantizer(
    name: str, slot: str, base: api.QuantSpec, role_map: list, user: list[tuple[str, dict[str, Any] | None]]
) -> nn.Module:
    """The quantizer of ``<name>.<slot>_quantizer`` (an ``EmptySlot`` when an override keeps it float)."""
    rows = matching(role_map, name, slot)
    if not rows:
        raise RuntimeError(f"attention slot {name}.{slot} is not covered by the SAM2 role map")
    full = f"{name}.{slot}_quantizer"
    spec = base
    for row in rows:
        spec = spec.updated(row.overrides, f"SAM2 role map {row.pattern!r} [{slot}]")
    for pattern, override in user:
        if not fnmatch.fnmatchcase(full, pattern):
            continue
        if override is None:
            return EmptySlot()
        if "act" in override:
            spec = spec.updated(override["act"], f"override {pattern!r} [act]")
    return api.build_quantizer(spec, rows[-1].role, full)


def quantize_sam2(
    model: SAM2Base, qconfig: QConfig, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT
) -> SAM2Base:
    """Swap ``model`` (in place) to its quantized form with every quantizer built but OFF; returns it."""
    _check_model(model, "quantize_sam2")
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"quantize_sam2 expects a QConfig, got {type(qconfig).__name__}")
    patterns = float_patterns(True, keep_float)
    prepare_sam2(model, patterns)
    role_map = sam2_role_map(qconfig)
    act = api.QuantSpec(**_spec_fields(qconfig.a_qconfig))
    weight = api.QuantSpec(**_spec_fields(qconfig.w_qconfig))
    decoder = _decoder_split(qconfig)
    overrides: list[tuple[str, dict[str, Any] | None]] = [(DECODER_PATTERN, decoder)] if decoder else []
    overrides += [(a.pattern, {"act": a.overrides}) for a in role_map if a.slot == "input" and a.overrides]
    user = _user_overrides(qconfig)
    skip = [p for pattern in patterns for p in (pattern, f"{pattern}.*")]
    api.quantize(model, act=act, weight=weight, overrides=overrides + user, skip=skip)

    decoder_act = act.updated(decoder["act"], "decoder_a_qconfig") if "act" in decoder else act
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.input_quantizer is not None:
            if not matching(role_map, name, "input"):
                raise RuntimeError(f"quantized layer {name!r} is not covered by the SAM2 role map; "
                                   "keep it float (keep_float) or add a role-map row")
    for name, twin in attention_twins(model):
        base = decoder_act if fnmatch.fnmatchcase(name, DECODER_PATTERN) else act
        for slot in ATTENTION_SLOTS:
            twin.set_quantizer(slot, _slot_quantizer(name, slot, base, role_map, user))
    return model
