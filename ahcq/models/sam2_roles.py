"""The SAM2 role map: one table giving every quantizer slot of SAM2 its Role and quantizer kind.

Rows, slots and kinds follow ``roles``. The AHCQ-SAM SAM2 recipe puts ``CAG`` on the mask decoder only
(q/k/v_proj, MLP lin1), ``HLUQ`` on the post-GELU Hiera MLP and the post-ReLU decoder MLP, ``LNQ_SOFTMAX``
on the Hiera attention and ``AGQ_SOFTMAX`` on the memory attention and the mask decoder.

``big`` marks the key slots of the decoder's per-layer token→image attentions, which PTQ4SAM's BIG sign
folding acts on in the AHCQ-SAM SAM2 code (the final attention is not folded there, unlike SAM). The memory-
attention FFN's ``linear2`` sees a functional ReLU's output; the recipe keeps it uniform, as the reference
does.
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
    RoleRule(f"{_HIERA}.attn.qkv", "input", Role.INPUT, Feature.UNIFORM),
    *attention_rules(f"{_HIERA}.attn", Feature.LNQ_SOFTMAX),
    RoleRule(f"{_HIERA}.attn.proj", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_HIERA}.mlp.layers.0", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_HIERA}.mlp.layers.1", "input", Role.INPUT, Feature.HLUQ),
    RoleRule(f"{_HIERA}.proj", "input", Role.INPUT, Feature.UNIFORM),
    # FPN neck lateral convs
    RoleRule("image_encoder.neck.convs.*.conv", "input", Role.INPUT, Feature.UNIFORM),
    # memory attention: RoPE self- and cross-attention, FFN
    RoleRule(f"{_MEM_ATTN}.*_proj", "input", Role.INPUT, Feature.UNIFORM),
    *attention_rules(_MEM_ATTN, Feature.AGQ_SOFTMAX),
    RoleRule(f"{_MEM}.linear1", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM}.linear2", "input", Role.INPUT, Feature.UNIFORM),
    # memory encoder convolutions (mask downsampler, pixel projection, fuser CXBlocks, output projection)
    RoleRule(f"{_MEM_ENC}.mask_downsampler.encoder.*", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.pix_feat_proj", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.fuser.proj", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.dwconv", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.pwconv1", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.fuser.layers.*.pwconv2", "input", Role.INPUT, Feature.UNIFORM),
    RoleRule(f"{_MEM_ENC}.out_proj", "input", Role.INPUT, Feature.UNIFORM),
    # SAM2 mask decoder: two-way transformer (self, token->image, image->token, final attention), MLP
    *decoder_rules("sam_mask_decoder.transformer", Feature.AGQ_SOFTMAX, ("mlp.layers.0", "mlp.layers.1"),
                   big_pattern="layers.*.cross_attn_token_to_image"),
)


def sam2_role_map(qconfig: QConfig) -> list[RoleAssignment]:
    """The role table resolved against ``qconfig``'s method switches, in table order."""
    return resolve_table(SAM2_ROLE_TABLE, qconfig, "sam2_role_map")


def sam2_big_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention twin)`` of every attention whose key slot BIG acts on."""
    return table_big_sites(model, SAM2_ROLE_TABLE, QuantSam2Attention)
