"""From a ``QConfig`` and a resolved role map to built quantizers: the steps ``quantize_sam`` and
``quantize_sam2`` share.

Order of precedence for an activation slot (later wins): ``a_qconfig`` (``decoder_a_qconfig`` under the
mask decoder when a config splits them), the role map, then the config's own ``overrides``. Linear/Conv
layers are swapped by the generic ``api.quantize`` (weights per ``w_qconfig``); the attention twins'
q/k/v/prob slots are filled here, because they are not layers the generic API knows.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from ahcq.models.roles import RoleAssignment, matching
from ahcq.models.sam_attention import ATTENTION_SLOTS, EmptySlot
from ahcq.quantization import api
from ahcq.quantization.config import QConfig, QSpecConfig

__all__ = ["UserOverrides", "fill_twin_slots", "override_matches", "quantize_layers", "user_overrides"]

UserOverrides = list[tuple[str, dict[str, Any] | None]]


def override_matches(pattern: str, name: str) -> bool:
    """Override patterns as ``api.quantize`` reads them: ``fnmatch``, or a full-match regex after ``re:``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _spec_fields(spec: QSpecConfig | dict[str, Any]) -> dict[str, Any]:
    """YAML recipe keys -> ``QuantSpec`` fields (``bit`` -> ``bits``; unset keys dropped)."""
    items = dataclasses.asdict(spec) if isinstance(spec, QSpecConfig) else dict(spec)
    return {("bits" if k == "bit" else k): v for k, v in items.items() if v is not None}


def user_overrides(qconfig: QConfig) -> UserOverrides:
    """The config's ``overrides`` as ``api.quantize`` takes them (``None`` keeps the match float)."""
    out: UserOverrides = []
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


def quantize_layers(
    model: nn.Module, qconfig: QConfig, role_map: list[RoleAssignment], user: UserOverrides,
    float_patterns: tuple[str, ...], decoder_pattern: str,
) -> tuple[api.QuantSpec, api.QuantSpec]:
    """Swap the Linear/Conv layers of ``model`` outside ``float_patterns`` (``api.quantize``).

    Returns the activation recipes of the attention slots: the default one and the mask decoder's.
    """
    act = api.QuantSpec(**_spec_fields(qconfig.a_qconfig))
    weight = api.QuantSpec(**_spec_fields(qconfig.w_qconfig))
    decoder = _decoder_split(qconfig)
    overrides: UserOverrides = [(decoder_pattern, decoder)] if decoder else []
    overrides += [(a.pattern, {"act": a.overrides}) for a in role_map if a.slot == "input" and a.overrides]
    skip = [p for pattern in float_patterns for p in (pattern, f"{pattern}.*")]
    api.quantize(model, act=act, weight=weight, overrides=overrides + user, skip=skip)
    return act, act.updated(decoder["act"], "decoder_a_qconfig") if "act" in decoder else act


def _slot_quantizer(
    name: str, slot: str, base: api.QuantSpec, role_map: list[RoleAssignment], user: UserOverrides, label: str
) -> nn.Module:
    """The quantizer of ``<name>.<slot>_quantizer`` (an ``EmptySlot`` when an override keeps it float)."""
    rows = matching(role_map, name, slot)
    if not rows:
        raise RuntimeError(f"attention slot {name}.{slot} is not covered by the {label}")
    full = f"{name}.{slot}_quantizer"
    spec = base
    for row in rows:
        spec = spec.updated(row.overrides, f"{label} {row.pattern!r} [{slot}]")
    for pattern, override in user:
        if not override_matches(pattern, full):
            continue
        if override is None:
            return EmptySlot()
        if "act" in override:
            spec = spec.updated(override["act"], f"override {pattern!r} [act]")
    return api.build_quantizer(spec, rows[-1].role, full)


def fill_twin_slots(
    twins: Iterable[tuple[str, nn.Module]], recipes: tuple[api.QuantSpec, api.QuantSpec],
    decoder_pattern: str, role_map: list[RoleAssignment], user: UserOverrides, label: str,
) -> None:
    """Build every q/k/v/prob quantizer of the attention ``twins`` from the ``quantize_layers`` recipes.

    ``label`` names the role map in messages (e.g. ``"SAM role map"``).
    """
    act, decoder_act = recipes
    for name, twin in twins:
        base = decoder_act if fnmatch.fnmatchcase(name, decoder_pattern) else act
        for slot in ATTENTION_SLOTS:
            twin.set_quantizer(slot, _slot_quantizer(name, slot, base, role_map, user, label))
