"""Quant-aware twins of segment_anything's two attention modules.

Upstream computes ``q·kᵀ``, softmax and ``attn·v`` functionally, so swapping modules alone cannot reach
them. The twins re-express the same forward with named quantizer slots between those ops. A twin is built
from an upstream instance and reuses its Linear children and rel-pos parameters (no copies); with every slot
empty it performs the upstream ops in the upstream order, so its output is bit-identical.

Slots (``ATTENTION_SLOTS``): ``q``, ``k``, ``v`` and ``prob`` (the softmax output). Each holds a quantizer
or ``None`` (the identity, as an empty slot of ``QuantLinear``); quantizers receive side inputs as keywords
(``value=`` for the
value-aware probability quantizers AGQ/LNQ, given the *quantized* v that ``attn·v`` really multiplies).
The slots live on the twin rather than in ``QuantMatMul`` operand slots because one quantized q feeds both
``q·kᵀ`` and the rel-pos term, and one quantized v feeds both ``attn·v`` and the probability quantizer's
search; operand quantizers inside a matmul would quantize them twice or see the float v.

Rel-pos decision (encoder): the decomposed relative-position term is computed from the *quantized* query,
as PTQ4SAM and AHCPTQ do, so that the whole logit is a function of the integer q codes (one q tensor feeds
both ``q·kᵀ`` and ``q·R`` in hardware). SAQ-SAM uses the float query; set ``rel_pos_float_q = True`` for that.
"""
from __future__ import annotations

import math

import torch
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

from ahcq.quantization.layers import apply_slot

__all__ = [
    "ATTENTION_SLOTS", "QuantDecoderAttention", "QuantEncoderAttention", "SlottedAttention",
]

ATTENTION_SLOTS = ("q", "k", "v", "prob")


class SlottedAttention(nn.Module):
    """Slot handling of every attention twin (SAM's and SAM2's): ``<slot>_quantizer`` children, set and read
    by slot name."""

    def __init__(self) -> None:
        super().__init__()
        self._empty_slots()

    def _empty_slots(self) -> None:
        for slot in ATTENTION_SLOTS:
            self.register_module(f"{slot}_quantizer", None)

    def _slot_attr(self, slot: str) -> str:
        if slot not in ATTENTION_SLOTS:
            raise KeyError(f"{type(self).__name__} has no slot {slot!r}; slots are {ATTENTION_SLOTS}")
        return f"{slot}_quantizer"

    def set_quantizer(self, slot: str, quantizer: nn.Module | None) -> None:
        """Install ``quantizer`` in ``slot`` (one of ``ATTENTION_SLOTS``); ``None`` empties it."""
        self.register_module(self._slot_attr(slot), quantizer)

    def quantizer(self, slot: str) -> nn.Module | None:
        """The module in ``slot`` (``None`` when the slot is empty)."""
        return getattr(self, self._slot_attr(slot))


class QuantEncoderAttention(SlottedAttention):
    """Twin of ``image_encoder.Attention``: q/k/v slots after the split into heads, prob after softmax."""

    def __init__(self, attn: sam_image_encoder.Attention) -> None:
        if not isinstance(attn, sam_image_encoder.Attention):
            raise TypeError(f"expected segment_anything image_encoder.Attention, got {type(attn).__name__}")
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        self.rel_pos_float_q = False
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape  # B x H x W x C (a window or the whole grid)
        # qkv: 3 x B x N_heads x HW x C_per_head
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # q, k, v: B*N_heads x HW x C_per_head
        q_float, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        q = apply_slot(self.q_quantizer, q_float)
        k = apply_slot(self.k_quantizer, k)
        v = apply_slot(self.v_quantizer, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B*N_heads x HW x HW
        if self.use_rel_pos:
            q_rel = q_float if self.rel_pos_float_q else q
            attn = sam_image_encoder.add_decomposed_rel_pos(
                attn, q_rel, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
            )
        attn = apply_slot(self.prob_quantizer, attn.softmax(dim=-1), value=v)
        # B*N_heads x HW x C_per_head -> B x H x W x N_heads x C_per_head -> B x H x W x C
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class QuantDecoderAttention(SlottedAttention):
    """Twin of ``transformer.Attention``: q/k/v slots on the projection outputs, prob after softmax.

    The k slot sits before the head split, on the channels of ``k_proj``'s output, which is where BIG's
    per-channel sign folding acts on the token→image attentions.
    """

    def __init__(self, attn: sam_transformer.Attention) -> None:
        if not isinstance(attn, sam_transformer.Attention):
            raise TypeError(f"expected segment_anything transformer.Attention, got {type(attn).__name__}")
        super().__init__()
        self.embedding_dim = attn.embedding_dim
        self.internal_dim = attn.internal_dim
        self.num_heads = attn.num_heads
        self.q_proj = attn.q_proj
        self.k_proj = attn.k_proj
        self.v_proj = attn.v_proj
        self.out_proj = attn.out_proj

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # B x N_tokens x C -> B x N_heads x N_tokens x C_per_head
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # input projections (quantized on the channels of their outputs), then the head split
        q = self._separate_heads(apply_slot(self.q_quantizer, self.q_proj(q)))
        k = self._separate_heads(apply_slot(self.k_quantizer, self.k_proj(k)))
        v = self._separate_heads(apply_slot(self.v_quantizer, self.v_proj(v)))
        attn = q @ k.permute(0, 1, 3, 2)  # B x N_heads x N_tokens x N_tokens
        attn = attn / math.sqrt(q.shape[-1])
        attn = apply_slot(self.prob_quantizer, torch.softmax(attn, dim=-1), value=v)
        out = attn @ v  # B x N_heads x N_tokens x C_per_head
        b, n_heads, n_tokens, c_per_head = out.shape
        out = out.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)  # B x N_tokens x C
        return self.out_proj(out)
