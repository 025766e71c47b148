"""SAM-specific parts: quant-aware twins of segment_anything modules, role map, checkpoint loading."""
from ahcq.models.sam import DEFAULT_KEEP_FLOAT, float_patterns, is_kept_float, prepare_sam
from ahcq.models.sam_attention import ATTENTION_SLOTS, QuantDecoderAttention, QuantEncoderAttention
from ahcq.models.sam_checkpoint import SAM_VARIANTS, SamSpec, build_sam, infer_model_type, load_sam
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_roles import SAM_ROLE_TABLE, RoleAssignment, RoleRule, big_sites, sam_role_map

__all__ = [
    "ATTENTION_SLOTS",
    "DEFAULT_KEEP_FLOAT",
    "SAM_ROLE_TABLE",
    "SAM_VARIANTS",
    "QuantDecoderAttention",
    "QuantEncoderAttention",
    "RoleAssignment",
    "RoleRule",
    "SamSpec",
    "big_sites",
    "build_sam",
    "float_patterns",
    "infer_model_type",
    "is_kept_float",
    "load_sam",
    "prepare_sam",
    "quantize_sam",
    "sam_role_map",
]
