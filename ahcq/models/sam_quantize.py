"""``quantize_sam``: build every quantizer of a SAM from a ``QConfig`` and the SAM role map.

Order of precedence for an activation slot (later wins): ``a_qconfig`` (``decoder_a_qconfig`` under
``mask_decoder`` when a config splits them), the role map, then the config's own ``overrides``.
Linear/Conv layers are swapped by the generic ``api.quantize`` (weights per ``w_qconfig``); the attention
twins' q/k/v/prob slots are filled here, because they are not layers the generic API knows. Every
quantized slot must be covered by the role map, so a segment_anything release that moves a layer fails
loudly, before anything is changed, instead of silently getting a default quantizer.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from typing import Any

from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.models.sam import DEFAULT_KEEP_FLOAT, float_patterns, is_kept_float, prepare_sam
from ahcq.models.sam_attention import ATTENTION_SLOTS, EmptySlot, QuantDecoderAttention, QuantEncoderAttention
from ahcq.models.sam_roles import matching, sam_role_map
from ahcq.quantization import api
from ahcq.quantization.config import QConfig, QSpecConfig

__all__ = ["DECODER_PATTERN", "quantize_sam"]

DECODER_PATTERN = "mask_decoder.*"
_TWINS = (QuantEncoderAttention, QuantDecoderAttention)
_ATTENTIONS = (sam_image_encoder.Attention, sam_transformer.Attention, *_TWINS)


def _matches(pattern: str, name: str) -> bool:
    """Override patterns as ``api.quantize`` reads them: ``fnmatch``, or a full-match regex after ``re:``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _spec_fields(spec: QSpecConfig | dict[str, Any]) -> dict[str, Any]:
    """YAML recipe keys -> ``QuantSpec`` fields (``bit`` -> ``bits``; unset keys dropped)."""
    items = dataclasses.asdict(spec) if isinstance(spec, QSpecConfig) else dict(spec)
    return {("bits" if k == "bit" else k): v for k, v in items.items() if v is not None}


def _user_overrides(qconfig: QConfig) -> list[tuple[str, dict[str, Any] | None]]:
    out: list[tuple[str, dict[str, Any] | None]] = []
    for o in qconfig.overrides:
        if o.keep_float:
            out.append((o.pattern, None))
            continue
        partial: dict[str, Any] = {}
        if o.act:
            partial["act"] = _spec_fields(dict(o.act))
        if o.weight:
            partial["weight"] = _spec_fields(dict(o.weight))
        out.append((o.pattern, partial))
    return out


def _decoder_split(qconfig: QConfig) -> dict[str, dict[str, Any]]:
    """SAQ-SAM's separate decoder recipes, where they differ from the default ones."""
    split = {"act": (qconfig.decoder_a_qconfig, qconfig.a_qconfig),
             "weight": (qconfig.decoder_w_qconfig, qconfig.w_qconfig)}
    return {slot: _spec_fields(dec) for slot, (dec, base) in split.items() if dec is not None and dec != base}


def _slot_spec(
    name: str, base: api.QuantSpec, role_map: list, user: list[tuple[str, dict[str, Any] | None]]
) -> api.QuantSpec | None:
    """Spec of one attention slot ``name`` = ``<attention>.<slot>_quantizer``; ``None`` keeps it empty."""
    attn, _, slot_attr = name.rpartition(".")
    spec = base
    for assignment in matching(role_map, attn, slot_attr.removesuffix("_quantizer")):
        spec = spec.updated(assignment.overrides, f"SAM role map {assignment.pattern!r} [{assignment.slot}]")
    for pattern, override in user:
        if not _matches(pattern, name):
            continue
        if override is None:
            return None
        if "act" in override:
            spec = spec.updated(override["act"], f"override {pattern!r} [act]")
    return spec


def _check_scope(sam: Sam, patterns: tuple[str, ...], role_map: list, user_float: list[str]) -> None:
    """Refuse, before anything changes, a model that is already quantized or has slots the map misses."""
    first = next(api.iter_quantizers(sam), None)
    if first is not None:
        raise ValueError(f"quantize_sam needs a float SAM, but it already holds quantizer {first[0]!r}")
    for name, module in sam.named_modules():
        if is_kept_float(name, patterns) or any(_matches(p, name) for p in user_float):
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
    user = _user_overrides(qconfig)
    _check_scope(sam, patterns, role_map, [pattern for pattern, override in user if override is None])
    prepare_sam(sam, quant_encoder, patterns)
    act = api.QuantSpec(**_spec_fields(qconfig.a_qconfig))
    weight = api.QuantSpec(**_spec_fields(qconfig.w_qconfig))
    decoder = _decoder_split(qconfig)
    overrides: list[tuple[str, dict[str, Any] | None]] = [(DECODER_PATTERN, decoder)] if decoder else []
    overrides += [(a.pattern, {"act": a.overrides}) for a in role_map if a.slot == "input" and a.overrides]
    skip = [p for pattern in patterns for p in (pattern, f"{pattern}.*")]
    api.quantize(sam, act=act, weight=weight, overrides=overrides + user, skip=skip)

    decoder_act = act.updated(decoder["act"], "decoder_a_qconfig") if "act" in decoder else act
    for name, module in list(sam.named_modules()):
        if not isinstance(module, _TWINS):
            continue
        base = decoder_act if fnmatch.fnmatchcase(name, DECODER_PATTERN) else act
        for slot in ATTENTION_SLOTS:
            qname = f"{name}.{slot}_quantizer"
            role = matching(role_map, name, slot)[-1].role
            spec = _slot_spec(qname, base, role_map, user)
            quantizer = EmptySlot() if spec is None else api.build_quantizer(spec, role, qname)
            module.set_quantizer(slot, quantizer)
    return sam
