"""The SAM2 role map: one table giving every quantizer slot of SAM2 its Role and quantizer kind.

Rows follow the SAM table's conventions (``sam_roles``): ``pattern`` is an ``fnmatch`` module-name pattern,
``slot`` is ``input`` (the input quantizer of a ``QuantLinear``/``QuantConv2d``) or an attention twin's
``q``/``k``/``v``/``prob``; weight slots are not listed (every quantized layer takes ``w_qconfig``). The
AHCQ-SAM SAM2 recipe resolves the kinds:

==================  ==========================================================================
``uniform``         ``a_qconfig`` as it is
``cag``             channel-aware grouping when ``ahcptq.cag`` (mask decoder only: q/k/v_proj, MLP lin1)
``hluq``            hybrid log-uniform when ``ahcptq.hluq`` (post-GELU Hiera MLP and post-ReLU decoder MLP)
``hiera_softmax``   LNQ when ``lnq.enabled``, else AGQ when ``ptq4sam.AGQ``
``agq_softmax``     AGQ when ``ptq4sam.AGQ`` (memory attention and mask decoder)
==================  ==========================================================================

``big`` marks the key slots of the decoder's token→image attentions, which PTQ4SAM's BIG sign folding acts
on (the quantizer stays uniform). The memory-attention FFN's ``linear2`` sees a functional ReLU's output;
the recipe keeps it uniform, as the reference does.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ahcq.models.sam2_attention import QuantSam2Attention
from ahcq.models.sam_roles import RoleAssignment, RoleRule, matching
from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role

__all__ = ["SAM2_ROLE_TABLE", "matching", "sam2_big_sites", "sam2_role_map"]

_HIERA = "image_encoder.trunk.blocks.*"
_MEM = "memory_attention.layers.*"
_MEM_ATTN = f"{_MEM}.*attn*"
_DEC = "sam_mask_decoder.transformer.*"
_DEC_ATTN = "sam_mask_decoder.transformer.*attn*"
_MEM_ENC = "memory_encoder"


def _attention(pattern: str, prob_kind: str) -> tuple[RoleRule, ...]:
    return (
        RoleRule(pattern, "q", Role.QUERY, "uniform"),
        RoleRule(pattern, "k", Role.KEY, "uniform"),
        RoleRule(pattern, "v", Role.VALUE, "uniform"),
        RoleRule(pattern, "prob", Role.ATTN_PROB, prob_kind),
    )


SAM2_ROLE_TABLE: tuple[RoleRule, ...] = (
    # Hiera trunk: attention, MLP, stage-change residual projection
    RoleRule(f"{_HIERA}.attn.qkv", "input", Role.INPUT, "uniform"),
    *_attention(f"{_HIERA}.attn", "hiera_softmax"),
    RoleRule(f"{_HIERA}.attn.proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_HIERA}.mlp.layers.0", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_HIERA}.mlp.layers.1", "input", Role.INPUT, "hluq"),
    RoleRule(f"{_HIERA}.proj", "input", Role.INPUT, "uniform"),
    # FPN neck lateral convs
    RoleRule("image_encoder.neck.convs.*.conv", "input", Role.INPUT, "uniform"),
    # memory attention: RoPE self- and cross-attention, FFN
    RoleRule(f"{_MEM_ATTN}.*_proj", "input", Role.INPUT, "uniform"),
    *_attention(_MEM_ATTN, "agq_softmax"),
    RoleRule(f"{_MEM}.linear1", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM}.linear2", "input", Role.INPUT, "uniform"),
    # memory encoder convolutions (mask downsampler, pixel projection, fuser CXBlocks, output projection)
    RoleRule(f"{_MEM_ENC}.mask_downsampler.encoder.*", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.pix_feat_proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.fuser.proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.dwconv", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.pwconv1", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.pwconv2", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_MEM_ENC}.out_proj", "input", Role.INPUT, "uniform"),
    # SAM2 mask decoder: two-way transformer (self, token->image, image->token, final attention), MLP
    RoleRule(f"{_DEC}.q_proj", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.k_proj", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.v_proj", "input", Role.INPUT, "cag"),
    *_attention(_DEC_ATTN, "agq_softmax"),
    RoleRule("sam_mask_decoder.transformer.*token_to_image", "k", Role.KEY, "uniform", big=True),
    RoleRule(f"{_DEC}.out_proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_DEC}.mlp.layers.0", "input", Role.INPUT, "cag"),
    RoleRule(f"{_DEC}.mlp.layers.1", "input", Role.INPUT, "hluq"),
)


def _per_tensor(quantizer: str, **extra: Any) -> dict[str, Any]:
    """Families that are per tensor and asymmetric by construction (AGQ, LNQ, HLUQ)."""
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
    if kind == "hiera_softmax":
        return _per_tensor("lnq", alphas=qconfig.lnq.alphas) if qconfig.lnq.enabled else agq
    if kind == "agq_softmax":
        return agq
    raise ValueError(f"SAM2 role table: unknown kind {kind!r}")


def sam2_role_map(qconfig: QConfig) -> list[RoleAssignment]:
    """The role table resolved against ``qconfig``'s method switches, in table order."""
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"sam2_role_map expects a QConfig, got {type(qconfig).__name__}")
    return [
        RoleAssignment(rule.pattern, rule.slot, _resolve(rule.kind, qconfig), rule.role, rule.big)
        for rule in SAM2_ROLE_TABLE
    ]


def sam2_big_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention twin)`` of every attention whose key slot BIG acts on."""
    rules = [r for r in SAM2_ROLE_TABLE if r.big]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, QuantSam2Attention) and any(matching(rules, name, "k"))
    ]
