"""The SAM role map: one table saying, for every quantizer slot of SAM, its Role and its quantizer kind.

Each row names modules by pattern (``fnmatch``, as ``ahcq.quantization.api``; ``*`` also crosses dots) and
a slot: ``input`` is the input quantizer of a ``QuantLinear``/``QuantConv2d``; ``q``/``k``/``v``/``prob`` are
the attention twins' slots (``sam_attention``). Weight slots are not listed: every quantized Linear/Conv
takes ``w_qconfig`` per output channel. A row's ``kind`` is a method feature that the config resolves:

=================  ==============================================================================
``uniform``        ``a_qconfig`` as it is
``cag``            channel-aware grouping when ``ahcptq.cag`` (qkv, q/k/v_proj and MLP lin1 inputs)
``hluq``           hybrid log-uniform when ``ahcptq.hluq`` (lin2 inputs: post-GELU encoder, post-ReLU decoder)
``enc_softmax``    AGQ when ``ptq4sam.AGQ``
``dec_softmax``    LNQ when ``lnq.enabled`` (AHCQ-SAM), else AGQ when ``ptq4sam.AGQ``
=================  ==============================================================================

``big`` marks the key outputs that PTQ4SAM's bimodal integration (BIG) acts on: the ``k`` slot of the
token→image attentions. BIG is an offline sign folding, not a quantizer kind, so the slot's quantizer stays
uniform; ``big_sites`` lists those attentions for the transform when ``ptq4sam.BIG`` is on.
"""
from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple

from torch import nn

from ahcq.models.sam_attention import QuantDecoderAttention
from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role

__all__ = ["SAM_ROLE_TABLE", "RoleAssignment", "RoleRule", "big_sites", "matching", "sam_role_map"]

_ENC = "image_encoder.blocks.*"
_DEC = "mask_decoder.transformer.*"
_ENC_ATTN = f"{_ENC}.attn"
_DEC_ATTN = "mask_decoder.transformer.*attn*"


class RoleRule(NamedTuple):
    """One row of the role table (before the config decides the quantizer kind)."""

    pattern: str
    slot: str
    role: Role
    kind: str
    big: bool = False


SAM_ROLE_TABLE: tuple[RoleRule, ...] = (
    # image encoder blocks
    RoleRule(f"{_ENC}.attn.qkv", "input", Role.INPUT, "cag"),
    RoleRule(_ENC_ATTN, "q", Role.QUERY, "uniform"),
    RoleRule(_ENC_ATTN, "k", Role.KEY, "uniform"),
    RoleRule(_ENC_ATTN, "v", Role.VALUE, "uniform"),
    RoleRule(_ENC_ATTN, "prob", Role.ATTN_PROB, "enc_softmax"),
    RoleRule(f"{_ENC}.attn.proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_ENC}.mlp.lin1", "input", Role.INPUT, "cag"),
    RoleRule(f"{_ENC}.mlp.lin2", "input", Role.INPUT, "hluq"),
    # image encoder neck (1x1 and 3x3 convs; the LayerNorm2d between them stays float)
    RoleRule("image_encoder.neck.*", "input", Role.INPUT, "uniform"),
    # mask decoder: self, token->image, image->token and final attention
    RoleRule(f"{_DEC}.q_proj", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.k_proj", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.v_proj", "input", Role.INPUT, "cag"),
    RoleRule(_DEC_ATTN, "q", Role.QUERY, "uniform"),
    RoleRule(_DEC_ATTN, "k", Role.KEY, "uniform"),
    RoleRule("mask_decoder.transformer.*token_to_image", "k", Role.KEY, "uniform", big=True),
    RoleRule(_DEC_ATTN, "v", Role.VALUE, "uniform"),
    RoleRule(_DEC_ATTN, "prob", Role.ATTN_PROB, "dec_softmax"),
    RoleRule(f"{_DEC}.out_proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_DEC}.mlp.lin1", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.mlp.lin2", "input", Role.INPUT, "hluq"),
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
    if kind == "dec_softmax" and qconfig.lnq.enabled:
        return _per_tensor("lnq", alphas=qconfig.lnq.alphas)
    if kind in ("enc_softmax", "dec_softmax"):
        return _per_tensor("agq", taus=qconfig.agq.taus) if qconfig.ptq4sam.agq else {}
    raise ValueError(f"SAM role table: unknown kind {kind!r}")


def sam_role_map(qconfig: QConfig) -> list[RoleAssignment]:
    """The role table resolved against ``qconfig``'s method switches, in table order."""
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"sam_role_map expects a QConfig, got {type(qconfig).__name__}")
    return [
        RoleAssignment(rule.pattern, rule.slot, _resolve(rule.kind, qconfig), rule.role, rule.big)
        for rule in SAM_ROLE_TABLE
    ]


def matching(assignments: list[RoleAssignment], name: str, slot: str) -> list[RoleAssignment]:
    """The assignments that apply to ``slot`` of module ``name``; later ones win when applied in order."""
    return [a for a in assignments if a.slot == slot and fnmatch.fnmatchcase(name, a.pattern)]


def big_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention)`` of every attention twin whose key output BIG acts on."""
    patterns = [r.pattern for r in SAM_ROLE_TABLE if r.big]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, QuantDecoderAttention) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
