"""Role tables in general: rows, their resolution against a ``QConfig``, lookup by module and slot.

A role table (``sam_roles``, ``sam2_roles``) says, for every quantizer slot of a model, its Role and its
quantizer kind. Each row names modules by pattern (``fnmatch``, as ``ahcq.quantization.api``; ``*`` also
crosses dots) and a slot: ``input`` is the input quantizer of a ``QuantLinear``/``QuantConv2d``;
``q``/``k``/``v``/``prob`` are the attention twins' slots. Weight slots are not listed: every quantized
Linear/Conv takes ``w_qconfig`` per output channel. A row's ``kind`` is a ``recipe.Feature`` that the one
resolver (``ahcq.quantization.recipe.feature_fields``) turns into quantizer settings under the config's
method switches.

``big`` marks the key slots that PTQ4SAM's bimodal integration (BIG) folds signs into. BIG is an offline
sign folding; the key quantizers of every decoder attention are ``Feature.BIG_KEY`` (uniform, with
PTQ4SAM's MSE range search when BIG is on).
"""
from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple

from torch import nn

from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role
from ahcq.quantization.recipe import Feature, feature_fields

__all__ = [
    "Feature", "RoleAssignment", "RoleRule", "attention_rules", "decoder_rules", "matching", "resolve_table",
    "table_big_sites",
]


class RoleRule(NamedTuple):
    """One row of the role table (before the config decides the quantizer kind)."""

    pattern: str
    slot: str
    role: Role
    kind: Feature
    big: bool = False


def attention_rules(pattern: str, prob_kind: Feature, key_kind: Feature = Feature.UNIFORM
                    ) -> tuple[RoleRule, ...]:
    """The rows of an attention twin's slots: uniform q and v, ``key_kind`` on k, ``prob_kind`` on the
    probabilities."""
    return (
        RoleRule(pattern, "q", Role.QUERY, Feature.UNIFORM),
        RoleRule(pattern, "k", Role.KEY, key_kind),
        RoleRule(pattern, "v", Role.VALUE, Feature.UNIFORM),
        RoleRule(pattern, "prob", Role.ATTN_PROB, prob_kind),
    )


def decoder_rules(transformer: str, prob_kind: Feature, mlp: tuple[str, str],
                  big_pattern: str = "*token_to_image") -> tuple[RoleRule, ...]:
    """The rows of a two-way-transformer mask decoder (self, token->image, image->token, final attention)
    under the module name ``transformer``: CAG on the q/k/v projection and MLP ``mlp[0]`` inputs, HLUQ on the
    post-ReLU MLP ``mlp[1]`` input, ``prob_kind`` on the probabilities, PTQ4SAM's key search on every key,
    BIG's sign folding on the attentions matching ``big_pattern``, and CAG on every q and k operand when
    ``cag.operands`` asks for it."""
    layers = f"{transformer}.*"
    return (
        RoleRule(f"{layers}.q_proj", "input", Role.INPUT, Feature.CAG),
        RoleRule(f"{layers}.k_proj", "input", Role.INPUT, Feature.CAG),
        RoleRule(f"{layers}.v_proj", "input", Role.INPUT, Feature.CAG),
        *attention_rules(f"{transformer}.*attn*", prob_kind, key_kind=Feature.BIG_KEY),
        RoleRule(f"{transformer}.{big_pattern}", "k", Role.KEY, Feature.BIG_KEY, big=True),
        RoleRule(f"{transformer}.*attn*", "q", Role.QUERY, Feature.CAG_OPERAND),
        RoleRule(f"{transformer}.*attn*", "k", Role.KEY, Feature.CAG_OPERAND),
        RoleRule(f"{layers}.out_proj", "input", Role.INPUT, Feature.UNIFORM),
        RoleRule(f"{layers}.{mlp[0]}", "input", Role.INPUT, Feature.CAG),
        RoleRule(f"{layers}.{mlp[1]}", "input", Role.INPUT, Feature.HLUQ),
    )


class RoleAssignment(NamedTuple):
    """A resolved row: ``overrides`` are ``QuantSpec`` field updates over the activation recipe."""

    pattern: str
    slot: str
    overrides: dict[str, Any]
    role: Role
    big: bool = False


def resolve_table(table: tuple[RoleRule, ...], qconfig: QConfig, caller: str) -> list[RoleAssignment]:
    """``table`` resolved against ``qconfig``'s method switches, in table order."""
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"{caller} expects a QConfig, got {type(qconfig).__name__}")
    return [
        RoleAssignment(rule.pattern, rule.slot, feature_fields(qconfig, rule.kind), rule.role, rule.big)
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
