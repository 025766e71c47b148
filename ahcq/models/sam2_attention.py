"""Quant-aware twins of sam2's three attention modules.

sam2 runs every attention through the fused ``F.scaled_dot_product_attention``, which hides ``q·kᵀ``, the
softmax and ``probs·v``. The twins re-express it explicitly (``softmax(q·kᵀ·scale)·v``, the same default
scale ``1/sqrt(head_dim)``) with the slots of the SAM twins (``q``, ``k``, ``v``, ``prob``), so one solver,
BIG transform and exporter serve SAM and SAM2 alike. A twin reuses the original Linear children, q-pool and
RoPE tables (no copies). While the ``prob`` slot is the identity (empty, or a quantizer in ``Mode.OFF``)
the probabilities need not exist, so the twin keeps upstream's fused call: with empty slots it is
bit-identical to upstream, and float passes of a quantized model keep the fused kernel's speed. The
explicit path differs from the fused kernel only by float rounding (measured in the parity tests).

Each twin is also an instance of its upstream class (whose constructor it does not run), because sam2
dispatches on ``isinstance``: ``MemoryAttention`` passes ``num_k_exclude_rope`` only to a ``RoPEAttention``.

Slot placement:

- Hiera ``MultiScaleAttention``: after the head split and the (unchanged, upstream) q pooling, i.e. on
  the operands of the two products.
- Mask-decoder ``Attention``: on the projection outputs, before the head split (as the SAM decoder twin),
  so BIG's per-channel sign folding sees the ``k_proj`` channels.
- Memory-attention ``RoPEAttention``: after RoPE, which stays float; key tokens excluded from RoPE
  (``num_k_exclude_rope``, the object pointers) are quantized with the rest of ``k``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleAttention, do_pool
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam.transformer import Attention, RoPEAttention
from torch import nn

from ahcq.models.sam_attention import SlottedAttention
from ahcq.quantization.layers import apply_slot
from ahcq.quantization.quantizers import Mode, Quantizer

__all__ = [
    "SAM2_TWINS",
    "SAM2_TWIN_TYPES",
    "QuantHieraAttention",
    "QuantRoPEAttention",
    "QuantSam2Attention",
    "make_twin",
]


class _Sam2SlottedAttention(SlottedAttention):
    """The SAM twins' slots plus the attention: fused unless the probabilities are quantized or observed."""

    def __init__(self, dropout_p: float = 0.0) -> None:
        nn.Module.__init__(self)  # not the upstream class's constructor (see the module doc)
        self.dropout_p = dropout_p
        self._empty_slots()

    def _prob_is_identity(self) -> bool:
        """Whether nothing needs the probabilities (an empty slot or a switched-off quantizer)."""
        prob = self.prob_quantizer
        return prob is None or (isinstance(prob, Quantizer) and prob.mode is Mode.OFF)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q·kᵀ/sqrt(d))·v`` on ``[..., tokens, head_dim]`` operands, with the prob slot.

        Upstream's fused call when the prob slot is the identity (bit-exact, fast). Dropout acts on the
        probabilities in training mode, as the fused kernel's ``dropout_p`` does.
        """
        if self._prob_is_identity():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # ... x N_q x N_k
        # without autograd the probabilities overwrite the scores (same bits, one large buffer fewer)
        probs = scores.softmax(dim=-1) if scores.requires_grad else torch.softmax(scores, -1, out=scores)
        attn = apply_slot(self.prob_quantizer, probs, value=v)
        if self.training and self.dropout_p > 0.0:
            attn = F.dropout(attn, self.dropout_p)
        return attn @ v


class QuantHieraAttention(_Sam2SlottedAttention, MultiScaleAttention):
    """Twin of Hiera's ``MultiScaleAttention`` (windowed or global, with or without q pooling)."""

    def __init__(self, attn: MultiScaleAttention) -> None:
        if not isinstance(attn, MultiScaleAttention):
            raise TypeError(f"expected sam2 MultiScaleAttention, got {type(attn).__name__}")
        super().__init__()
        self.dim, self.dim_out, self.num_heads = attn.dim, attn.dim_out, attn.num_heads
        self.q_pool = attn.q_pool
        self.qkv = attn.qkv
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape  # B x H x W x C
        # q, k, v: B x HW x N_heads x C_per_head
        q, k, v = torch.unbind(self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1), 2)
        if self.q_pool:  # pooled queries: B x H' x W' x C -> B x H'W' x N_heads x C_per_head
            q = do_pool(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        q = apply_slot(self.q_quantizer, q.transpose(1, 2))  # B x N_heads x N_q x C_per_head
        k = apply_slot(self.k_quantizer, k.transpose(1, 2))  # B x N_heads x N_k x C_per_head
        v = apply_slot(self.v_quantizer, v.transpose(1, 2))
        out = self._attend(q, k, v).transpose(1, 2).reshape(b, h, w, -1)  # B x H' x W' x C
        return self.proj(out)


class QuantSam2Attention(_Sam2SlottedAttention, Attention):
    """Twin of the mask decoder's ``Attention``: q/k/v slots on the projection outputs."""

    def __init__(self, attn: Attention) -> None:
        if not isinstance(attn, Attention):
            raise TypeError(f"expected sam2 transformer.Attention, got {type(attn).__name__}")
        super().__init__(attn.dropout_p)
        self.embedding_dim, self.kv_in_dim = attn.embedding_dim, attn.kv_in_dim
        self.internal_dim, self.num_heads = attn.internal_dim, attn.num_heads
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.out_proj = attn.out_proj

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return self._separate_heads(x, self.num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # B x N_tokens x C projections, quantized per channel, then B x N_heads x N_tokens x C_per_head
        q = self._heads(apply_slot(self.q_quantizer, self.q_proj(q)))
        k = self._heads(apply_slot(self.k_quantizer, self.k_proj(k)))
        v = self._heads(apply_slot(self.v_quantizer, self.v_proj(v)))
        return self.out_proj(self._recombine_heads(self._attend(q, k, v)))


class QuantRoPEAttention(QuantSam2Attention, RoPEAttention):
    """Twin of the memory attention's ``RoPEAttention``: RoPE in float, then the q/k/v slots."""

    def __init__(self, attn: RoPEAttention) -> None:
        if not isinstance(attn, RoPEAttention):
            raise TypeError(f"expected sam2 RoPEAttention, got {type(attn).__name__}")
        super().__init__(attn)
        self.compute_cis = attn.compute_cis
        self.freqs_cis = attn.freqs_cis
        self.rope_k_repeat = attn.rope_k_repeat

    def _rope(
        self, q: torch.Tensor, k: torch.Tensor, num_k_exclude_rope: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's rotary encoding of ``q`` and of all but the last ``num_k_exclude_rope`` keys."""
        side = math.sqrt(q.shape[-2])
        self.freqs_cis = self.freqs_cis.to(q.device)
        if self.freqs_cis.shape[0] != q.shape[-2]:
            self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(q.device)
        if q.shape[-2] != k.shape[-2] and not self.rope_k_repeat:
            raise ValueError(f"RoPE attention with {q.shape[-2]} queries and {k.shape[-2]} keys needs "
                             "rope_k_repeat=True")
        num_k_rope = k.size(-2) - num_k_exclude_rope
        q, k[:, :, :num_k_rope] = apply_rotary_enc(
            q, k[:, :, :num_k_rope], freqs_cis=self.freqs_cis, repeat_freqs_k=self.rope_k_repeat
        )
        return q, k

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        # B x N_heads x N_tokens x C_per_head, rotated (the last num_k_exclude_rope keys are not)
        q, k = self._rope(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), num_k_exclude_rope)
        q, k = apply_slot(self.q_quantizer, q), apply_slot(self.k_quantizer, k)
        v = apply_slot(self.v_quantizer, self._heads(self.v_proj(v)))
        return self.out_proj(self._recombine_heads(self._attend(q, k, v)))


# Most specific first: RoPEAttention is an Attention.
SAM2_TWINS: tuple[tuple[type[nn.Module], type[_Sam2SlottedAttention]], ...] = (
    (MultiScaleAttention, QuantHieraAttention),
    (RoPEAttention, QuantRoPEAttention),
    (Attention, QuantSam2Attention),
)
SAM2_TWIN_TYPES = tuple(twin for _, twin in SAM2_TWINS)


def make_twin(module: nn.Module) -> nn.Module | None:
    """The twin of an upstream sam2 attention (same training flag), or ``None`` for any other module."""
    if isinstance(module, SAM2_TWIN_TYPES):
        return None
    for upstream, twin in SAM2_TWINS:
        if isinstance(module, upstream):
            return twin(module).train(module.training)
    return None

