"""The SAM role map: one table saying, for every quantizer slot of SAM, its Role and its quantizer kind.

Rows, slots and kinds follow ``roles``. Here ``CAG`` covers the qkv, q/k/v_proj and MLP lin1 inputs,
``HLUQ`` the lin2 inputs (post-GELU encoder, post-ReLU decoder); every softmax, encoder and decoder, is
``LNQ_SOFTMAX`` (LNQ under AHCQ-SAM, as its reference code does on SAM; AGQ under PTQ4SAM). ``big`` marks
the ``k`` slot of the token→image attentions; ``big_sites`` lists those attentions for the transform when
``ptq4sam.BIG`` is on.
"""
from __future__ import annotations

from torch import nn

from ahcq.models.roles import (
    Feature,
    RoleAssignment,
    RoleRule,
    attention_rules,
    decoder_rules,
    matching,
    resolve_table,
    table_big_sites,
)
from ahcq.models.sam_attention import QuantDecoderAttention
from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role

__all__ = ["SAM_ROLE_TABLE", "RoleAssignment", "RoleRule", "big_sites", "matching", "sam_role_map"]

_ENC = "image_encoder.blocks.*"
_ENC_ATTN = f"{_ENC}.attn"


SAM_ROLE_TABLE: tuple[RoleRule, ...] = (
    # image encoder blocks
    RoleRule(f"{_ENC}.attn.qkv", "input", Role.INPUT, Feature.CAG),
    *attention_rules(_ENC_ATTN, Feature.LNQ_SOFTMAX),
    RoleRule(f"{_ENC}.attn.proj", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_ENC}.mlp.lin1", "input", Role.INPUT, Feature.CAG),
    RoleRule(f"{_ENC}.mlp.lin2", "input", Role.INPUT, Feature.HLUQ),
    # image encoder neck (1x1 and 3x3 convs; the LayerNorm2d between them stays float)
    RoleRule("image_encoder.neck.*", "input", Role.INPUT, Feature.UNIFORM),
    # mask decoder: self, token->image, image->token and final attention, MLP
    *decoder_rules("mask_decoder.transformer", Feature.LNQ_SOFTMAX, ("mlp.lin1", "mlp.lin2")),
)


def sam_role_map(qconfig: QConfig) -> list[RoleAssignment]:
    """The role table resolved against ``qconfig``'s method switches, in table order."""
    return resolve_table(SAM_ROLE_TABLE, qconfig, "sam_role_map")


def big_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention)`` of every attention twin whose key output BIG acts on."""
    return table_big_sites(model, SAM_ROLE_TABLE, QuantDecoderAttention)
