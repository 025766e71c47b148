"""Attention-twin slots from the one resolver: the step ``quantize_sam`` and ``quantize_sam2`` add to
``ahcq.quantization.recipe.quantize_layers``.

Linear/Conv layers are swapped by the resolver (weights per ``w_qconfig``, role-table inputs as site
features); the attention twins' q/k/v/prob slots are filled here, because they are not layers the generic
API knows. Precedence is the resolver's: the activation recipe (the decoder's under the decoder pattern),
the role-table feature, then the config's own ``overrides``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from ahcq.models.roles import RoleAssignment, matching
from ahcq.models.sam_attention import ATTENTION_SLOTS
from ahcq.quantization import api
from ahcq.quantization.recipe import SiteFields, UserOverrides

__all__ = ["fill_twin_slots", "input_sites", "skip_patterns"]


def skip_patterns(float_patterns: Iterable[str]) -> list[str]:
    """``api.quantize`` skip patterns that keep each kept-float module and everything under it float."""
    return [p for pattern in float_patterns for p in (pattern, f"{pattern}.*")]


def input_sites(role_map: list[RoleAssignment]) -> SiteFields:
    """The role map's Linear/Conv input rows as the resolver's site features."""
    return [(a.pattern, a.overrides) for a in role_map if a.slot == "input" and a.overrides]


def _slot_quantizer(
    name: str, slot: str, base: api.QuantSpec, role_map: list[RoleAssignment], user: UserOverrides, label: str
) -> nn.Module | None:
    """The quantizer of ``<name>.<slot>_quantizer`` (``None`` when an override keeps it float)."""
    rows = matching(role_map, name, slot)
    if not rows:
        raise RuntimeError(f"attention slot {name}.{slot} is not covered by the {label}")
    full = f"{name}.{slot}_quantizer"
    spec = base
    for row in rows:
        spec = spec.updated(row.overrides, f"{label} {row.pattern!r} [{slot}]")
    for pattern, override in user:
        if not api.name_matches(pattern, full):
            continue
        if override is None:
            return None
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
