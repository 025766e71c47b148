"""Role tables in general: rows, their resolution against a ``QConfig``, lookup by module and slot.

A role table (``sam_roles``, ``sam2_roles``) says, for every quantizer slot of a model, its Role and its
quantizer kind. Each row names modules by pattern (``fnmatch``, as ``ahcq.quantization.api``; ``*`` also
crosses dots) and a slot: ``input`` is the input quantizer of a ``QuantLinear``/``QuantConv2d``;
``q``/``k``/``v``/``prob`` are the attention twins' slots. Weight slots are not listed: every quantized
Linear/Conv takes ``w_qconfig`` per output channel. A row's ``kind`` is a method feature that the config
resolves:

=================  ==============================================================================
``uniform``        ``a_qconfig`` as it is
``cag``            channel-aware grouping when ``ahcptq.cag``
``hluq``           hybrid log-uniform when ``ahcptq.hluq``
``agq_softmax``    AGQ when ``ptq4sam.AGQ``
``lnq_softmax``    LNQ when ``lnq.enabled`` (AHCQ-SAM), else AGQ when ``ptq4sam.AGQ``
=================  ==============================================================================

``big`` marks the key slots that PTQ4SAM's bimodal integration (BIG) acts on. BIG is an offline sign
folding, not a quantizer kind, so the slot's quantizer stays uniform.
"""
from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple

from torch import nn

from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role

__all__ = [
    "RoleAssignment", "RoleRule", "attention_rules", "decoder_rules", "matching", "resolve_table",
    "table_big_sites",
]


class RoleRule(NamedTuple):
    """One row of the role table (before the config decides the quantizer kind)."""

    pattern: str
    slot: str
    role: Role
    kind: str
    big: bool = False


def attention_rules(pattern: str, prob_kind: str) -> tuple[RoleRule, ...]:
    """The rows of an attention twin's slots: uniform q, k and v, and ``prob_kind`` on the probabilities."""
    return (
        RoleRule(pattern, "q", Role.QUERY, "uniform"),
        RoleRule(pattern, "k", Role.KEY, "uniform"),
        RoleRule(pattern, "v", Role.VALUE, "uniform"),
        RoleRule(pattern, "prob", Role.ATTN_PROB, prob_kind),
    )


def decoder_rules(transformer: str, prob_kind: str, mlp: tuple[str, str]) -> tuple[RoleRule, ...]:
    """The rows of a two-way-transformer mask decoder (self, token->image, image->token, final attention)
    under the module name ``transformer``: CAG on the q/k/v projection and MLP ``mlp[0]`` inputs, HLUQ on the
    post-ReLU MLP ``mlp[1]`` input, ``prob_kind`` on the probabilities, BIG on the token->image keys."""
    layers = f"{transformer}.*"
    return (
        RoleRule(f"{layers}.q_proj", "input", Role.INPUT, "cag"),
        RoleRule(f"{layers}.k_proj", "input", Role.INPUT, "cag"),
        RoleRule(f"{layers}.v_proj", "input", Role.INPUT, "cag"),
        *attention_rules(f"{transformer}.*attn*", prob_kind),
        RoleRule(f"{transformer}.*token_to_image", "k", Role.KEY, "uniform", big=True),
        RoleRule(f"{layers}.out_proj", "input", Role.INPUT, "uniform"),
        RoleRule(f"{layers}.{mlp[0]}", "input", Role.INPUT, "cag"),
        RoleRule(f"{layers}.{mlp[1]}", "input", Role.INPUT, "hluq"),
    )


class RoleAssignment(NamedTuple):
    """A resolved row: ``overrides`` are ``QuantSpec`` field updates over the activation recipe."""

    pattern: str
    slot: str
    overrides: dict[str, Any]
    role: Role
    big: bool = False


def _per_tensor(quantizer: str, **extra: Any) -> dict[str, Any]:
    """Families that are per-tensor and asymmetric by construction (AGQ, LNQ, HLUQ)."""
    return {"quantizer": quantizer, "symmetric": False, "ch_axis": -1, "extra": dict(extra)}


def _resolve(kind: str, qconfig: QConfig) -> dict[str, Any]:
    agq = _per_tensor("agq", taus=qconfig.agq.taus) if qconfig.ptq4sam.agq else {}
    if kind == "uniform":
        return {}
    if kind == "cag":
        if not qconfig.ahcptq.cag:
            return {}
        return {"quantizer": "cag", "groups": qconfig.cag.groups, "extra": {"seed": qconfig.seed}}
    if kind == "hluq":
        if not qconfig.ahcptq.hluq:
            return {}
        hluq = qconfig.hluq
        return _per_tensor("hluq", range_splits=hluq.range_splits, level_splits=hluq.level_splits)
    if kind == "lnq_softmax":
        return _per_tensor("lnq", alphas=qconfig.lnq.alphas) if qconfig.lnq.enabled else agq
    if kind == "agq_softmax":
        return agq
    raise ValueError(f"role table: unknown kind {kind!r}")


def resolve_table(table: tuple[RoleRule, ...], qconfig: QConfig, caller: str) -> list[RoleAssignment]:
    """``table`` resolved against ``qconfig``'s method switches, in table order."""
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"{caller} expects a QConfig, got {type(qconfig).__name__}")
    return [
        RoleAssignment(rule.pattern, rule.slot, _resolve(rule.kind, qconfig), rule.role, rule.big)
        for rule in table
    ]


def matching(assignments: list[RoleAssignment], name: str, slot: str) -> list[RoleAssignment]:
    """The assignments that apply to ``slot`` of module ``name``; later ones win when applied in order."""
    return [a for a in assignments if a.slot == slot and fnmatch.fnmatchcase(name, a.pattern)]


def table_big_sites(
    model: nn.Module, table: tuple[RoleRule, ...], twin: type[nn.Module]
) -> list[tuple[str, nn.Module]]:
    """``(name, attention)`` of every ``twin`` whose key slot a ``big`` row of ``table`` marks."""
    patterns = [r.pattern for r in table if r.big]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, twin) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
