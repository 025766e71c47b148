"""The SAM2 role map: one table giving every quantizer slot of SAM2 its Role and quantizer kind.

Rows, slots and kinds follow ``roles``. The AHCQ-SAM SAM2 recipe puts ``cag`` on the mask decoder only
(q/k/v_proj, MLP lin1), ``hluq`` on the post-GELU Hiera MLP and the post-ReLU decoder MLP, ``lnq_softmax``
on the Hiera attention and ``agq_softmax`` on the memory attention and the mask decoder.

``big`` marks the key slots of the decoder's token→image attentions, which PTQ4SAM's BIG sign folding acts
on (the quantizer stays uniform). The memory-attention FFN's ``linear2`` sees a functional ReLU's output;
the recipe keeps it uniform, as the reference does.
"""
from __future__ import annotations

from torch import nn

from ahcq.models.roles import (
    RoleAssignment,
    RoleRule,
    attention_rules,
    decoder_rules,
    matching,
    resolve_table,
    table_big_sites,
)
from ahcq.models.sam2_attention import QuantSam2Attention
from ahcq.quantization.config import QConfig
from ahcq.quantization.quantizers import Role

__all__ = ["SAM2_ROLE_TABLE", "matching", "sam2_big_sites", "sam2_role_map"]

_HIERA = "image_encoder.trunk.blocks.*"
_MEM = "memory_attention.layers.*"
_MEM_ATTN = f"{_MEM}.*attn*"
_MEM_ENC = "memory_encoder"


SAM2_ROLE_TABLE: tuple[RoleRule, ...] = (
    # Hiera trunk: attention, MLP, stage-change residual projection
    RoleRule(f"{_HIERA}.attn.qkv", "input", Role.INPUT, "uniform"),
    *attention_rules(f"{_HIERA}.attn", "lnq_softmax"),
    RoleRule(f"{_HIERA}.attn.proj", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_HIERA}.mlp.layers.0", "input", Role.INPUT, "uniform"),
    RoleRule(f"{_HIERA}.mlp.layers.1", "input", Role.INPUT, "hluq"),
    RoleRule(f"{_HIERA}.proj", "input", Role.INPUT, "uniform"),
    # FPN neck lateral convs
    RoleRule("image_encoder.neck.convs.*.conv", "input", Role.INPUT, "uniform"),
    # memory attention: RoPE self- and cross-attention, FFN
    RoleRule(f"{_MEM_ATTN}.*_proj", "input", Role.INPUT, "uniform"),
    *attention_rules(_MEM_ATTN, "agq_softmax"),
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
    *decoder_rules("sam_mask_decoder.transformer", "agq_softmax", ("mlp.layers.0", "mlp.layers.1")),
)


def sam2_role_map(qconfig: QConfig) -> list[RoleAssignment]:
    """The role table resolved against ``qconfig``'s method switches, in table order."""
    return resolve_table(SAM2_ROLE_TABLE, qconfig, "sam2_role_map")


def sam2_big_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention twin)`` of every attention whose key slot BIG acts on."""
    return table_big_sites(model, SAM2_ROLE_TABLE, QuantSam2Attention)
