"""SAM-B Linear layers (tokens × Cin → Cout, count) and the activation quantizer AHCPTQ puts on each input.

Encoder: 12 blocks on 64×64 = 4096 image tokens (qkv, proj, MLP lin1/lin2). Mask decoder: two-way
transformer, depth 2, dim 256, MLP 2048, attention downsample 2 on the cross attentions, 7 prompt tokens
(2 box corners + IoU token + 4 mask tokens), plus the final token-to-image attention. Input kinds follow
AHCPTQ: HLUQ on MLP lin2 inputs, CAG on decoder q/k/v and MLP lin1 inputs, uniform elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKENS = 4096
PROMPT_TOKENS = 7
ENC_DIM, ENC_BLOCKS = 768, 12
DEC_DIM, DEC_MLP, DEC_DEPTH, DEC_CROSS = 256, 2048, 2, 128


@dataclass(frozen=True)
class LinearShape:
    """One Linear layer of the workload."""

    name: str
    tokens: int
    cin: int
    cout: int
    count: int
    kind: str

    @property
    def macs(self) -> int:
        return self.tokens * self.cin * self.cout * self.count


def _attention(prefix: str, q_tok: int, kv_tok: int, inner: int, count: int) -> list[LinearShape]:
    return [LinearShape(f"{prefix}.q_proj", q_tok, DEC_DIM, inner, count, "cag"),
            LinearShape(f"{prefix}.k_proj", kv_tok, DEC_DIM, inner, count, "cag"),
            LinearShape(f"{prefix}.v_proj", kv_tok, DEC_DIM, inner, count, "cag"),
            LinearShape(f"{prefix}.out_proj", q_tok, inner, DEC_DIM, count, "uniform")]


def sam_b_linears() -> list[LinearShape]:
    """Every Linear of SAM-B's image encoder and mask decoder for one image and one box prompt."""
    n, c = IMAGE_TOKENS, ENC_DIM
    layers = [LinearShape("encoder.qkv", n, c, 3 * c, ENC_BLOCKS, "uniform"),
              LinearShape("encoder.proj", n, c, c, ENC_BLOCKS, "uniform"),
              LinearShape("encoder.mlp.lin1", n, c, 4 * c, ENC_BLOCKS, "cag"),
              LinearShape("encoder.mlp.lin2", n, 4 * c, c, ENC_BLOCKS, "hluq")]
    p = PROMPT_TOKENS
    layers += _attention("decoder.self_attn", p, p, DEC_DIM, DEC_DEPTH)
    layers += _attention("decoder.cross_token_to_image", p, n, DEC_CROSS, DEC_DEPTH + 1)
    layers += _attention("decoder.cross_image_to_token", n, p, DEC_CROSS, DEC_DEPTH)
    layers += [LinearShape("decoder.mlp.lin1", p, DEC_DIM, DEC_MLP, DEC_DEPTH, "cag"),
               LinearShape("decoder.mlp.lin2", p, DEC_MLP, DEC_DIM, DEC_DEPTH, "hluq")]
    return layers
