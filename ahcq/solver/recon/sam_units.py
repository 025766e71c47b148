"""SAM's reconstruction units and the forward that runs the model along them.

Every unit maps one *residual stream* to the next, so a unit's output is exactly the next unit's input and
the engine's cached inputs and outputs compare cleanly (no shortcut has to be carried beside a unit):

* encoder attention unit ``x -> x + unpartition(attn(partition(norm1(x))))`` and MLP unit
  ``x -> x + mlp(norm2(x))``, on the ``(1, H, W, C)`` token grid; the loss therefore also asks the branch to
  compensate the error its input already carries (the whole block output, as in BRECQ);
* neck ``x -> neck(x.permute(0, 3, 1, 2))``, ``(1, C, h, w)``, loss summed over channels (axis 1);
* decoder units on ``(queries, keys)`` with the float positional encodings ``query_pe``/``key_pe`` as side
  inputs: each two-way sub-block returns the stream after its residual add and LayerNorm; the compared
  output is the stream it changes (keys for image->token, queries otherwise);
* SAQ-SAM stages: consecutive encoder blocks closed by a global-attention block, and whole two-way layers.

Wrappers hold the upstream submodules (no copies), so the quantizers are the model's own. Modules a unit
only *runs through* in float (PAR's neck and two-way transformer) are held outside the module tree, so the
engine never trains, drops or hardens their quantizers.
"""
from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from ahcq.quantization.api import quantization_disabled

__all__ = [
    "DecoderLayerUnit", "DecoderPart", "EncoderAttnUnit", "Part", "EncoderMlpUnit", "EncoderStageUnit",
    "FinalAttnUnit", "NeckUnit", "Prompted", "decoder_inputs", "encoder_stages", "float_transformer_keys",
]

Stream = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prompted:
    """One calibration image ready for the unit chain: encoder input (or float embedding) and its prompts.

    ``tokens`` ``(N, T, C)`` are the mask decoder's output tokens followed by the box embeddings, ``dense``
    ``(N, C, h, w)`` the (broadcast) no-mask embedding and ``image_pe`` ``(1, C, h, w)``.
    """

    image: torch.Tensor | None
    embedding: torch.Tensor | None
    tokens: torch.Tensor
    dense: torch.Tensor
    image_pe: torch.Tensor


def decoder_inputs(embedding: torch.Tensor, p: Prompted) -> tuple[torch.Tensor, ...]:
    """``(queries, keys, query_pe, key_pe)`` of the two-way transformer, as ``MaskDecoder.predict_masks``
    builds them (``key_pe`` broadcast over the boxes instead of copied; it is only ever added)."""
    n = p.tokens.shape[0]
    keys = (torch.repeat_interleave(embedding, n, dim=0) + p.dense).flatten(2).permute(0, 2, 1)
    key_pe = p.image_pe.flatten(2).permute(0, 2, 1).expand(n, -1, -1)
    return p.tokens, keys, p.tokens, key_pe


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters take no gradient within the block (gradients still flow through its
    activations): a float tail that PAR runs after a unit must not accumulate ``.grad`` step after step."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def float_transformer_keys(sam: Sam, embedding: torch.Tensor, p: Prompted) -> torch.Tensor:
    """Image-token output of the float two-way transformer for ``embedding`` (PAR's target space)."""
    transformer = sam.mask_decoder.transformer
    n = p.tokens.shape[0]
    src = torch.repeat_interleave(embedding, n, dim=0) + p.dense
    pos = torch.repeat_interleave(p.image_pe, n, dim=0)
    with quantization_disabled(transformer), frozen(transformer):
        return transformer(src, pos, p.tokens)[1]


class EncoderAttnUnit(nn.Module):
    """``x + unpartition(attn(partition(norm1(x))))`` of one encoder block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.window_size = block.norm1, block.attn, block.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size > 0:
            h, w = y.shape[1], y.shape[2]
            y, pad_hw = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(y), self.window_size, pad_hw, (h, w))
        else:
            y = self.attn(y)
        return x + y


class EncoderMlpUnit(nn.Module):
    """``x + mlp(norm2(x))`` of one encoder block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


class NeckUnit(nn.Module):
    """The neck on the NHWC token grid: ``neck(x.permute(0, 3, 1, 2))``."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))


class EncoderStageUnit(nn.Module):
    """Consecutive encoder blocks (upstream ``Block`` forwards). With ``sam`` given (SAQ-SAM layer skipping)
    it also returns the image tokens of the float neck + float two-way transformer run on its output, for
    the prompts passed in: ``(x, tokens, dense, image_pe) -> (stage output, image tokens)``."""

    def __init__(self, blocks: Sequence[nn.Module], sam: Sam | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self._sam = (sam,)  # a tuple keeps the float tail out of this unit's module tree

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                image_pe: torch.Tensor | None = None) -> torch.Tensor | Stream:
        for block in self.blocks:
            x = block(x)
        sam = self._sam[0]
        if sam is None:
            return x
        with quantization_disabled(sam.image_encoder.neck), frozen(sam.image_encoder.neck):
            embedding = sam.image_encoder.neck(x.permute(0, 3, 1, 2))
        prompted = Prompted(None, None, tokens, dense, image_pe)
        return x, float_transformer_keys(sam, embedding, prompted)


def encoder_stages(blocks: Sequence[nn.Module]) -> list[list[int]]:
    """Block indices of each stage: windowed blocks closed by a global-attention one (a tail without a
    global block is a stage of its own)."""
    stages: list[list[int]] = [[]]
    for i, block in enumerate(blocks):
        stages[-1].append(i)
        if block.window_size == 0:
            stages.append([])
    return [s for s in stages if s]


class Part(enum.Enum):
    """The sub-blocks of a two-way layer in forward order: the upstream attribute and the norm after it."""

    SELF_ATTN = ("self_attn", "norm1")
    TOKEN_TO_IMAGE = ("cross_attn_token_to_image", "norm2")
    MLP = ("mlp", "norm3")
    IMAGE_TO_TOKEN = ("cross_attn_image_to_token", "norm4")

    @property
    def attr(self) -> str:
        return self.value[0]

    @property
    def stream(self) -> int:
        """The stream the sub-block changes: 1 (keys) for image->token, 0 (queries) for the others."""
        return 1 if self is Part.IMAGE_TO_TOKEN else 0


class DecoderPart(nn.Module):
    """One sub-block of a two-way layer on the ``(queries, keys)`` stream, residual add and norm included."""

    def __init__(self, layer: nn.Module, part: Part) -> None:
        super().__init__()
        self.part = Part(part)
        self.block = getattr(layer, self.part.attr)
        self.norm = getattr(layer, self.part.value[1])
        self.skip_pe = self.part is Part.SELF_ATTN and layer.skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Stream:
        if self.part is Part.SELF_ATTN:
            if self.skip_pe:
                return self.norm(self.block(q=queries, k=queries, v=queries)), keys
            q = queries + query_pe
            return self.norm(queries + self.block(q=q, k=q, v=queries)), keys
        if self.part is Part.MLP:
            return self.norm(queries + self.block(queries)), keys
        q, k = queries + query_pe, keys + key_pe
        if self.part is Part.TOKEN_TO_IMAGE:
            return self.norm(queries + self.block(q=q, k=k, v=keys)), keys
        return queries, self.norm(keys + self.block(q=k, k=q, v=queries))


class DecoderLayerUnit(nn.Module):
    """A whole two-way layer (upstream forward) on the ``(queries, keys)`` stream (SAQ-SAM granularity).

    With ``transformer`` given (PAR) it also returns the token output of the whole transformer, the later
    layers and the final attention run in float: ``(queries, keys, final tokens)``.
    """

    def __init__(self, layer: nn.Module, transformer: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self._transformer = (transformer,)  # a tuple keeps the float tail out of this unit's module tree

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Stream | tuple[torch.Tensor, ...]:
        queries, keys = self.layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        transformer = self._transformer[0]
        if transformer is None:
            return queries, keys
        layers = list(transformer.layers)
        rest = [*layers[layers.index(self.layer) + 1:], transformer.final_attn_token_to_image]
        tokens, stream = queries, keys
        with contextlib.ExitStack() as stack:
            for module in rest:
                stack.enter_context(quantization_disabled(module))
                stack.enter_context(frozen(module))
            stack.enter_context(frozen(transformer.norm_final_attn))
            for layer in rest[:-1]:
                tokens, stream = layer(queries=tokens, keys=stream, query_pe=query_pe, key_pe=key_pe)
            tokens = FinalAttnUnit(transformer)(tokens, stream, query_pe, key_pe)[0]
        return queries, keys, tokens


class FinalAttnUnit(nn.Module):
    """The final token->image attention with its residual add and ``norm_final_attn``; keys pass through."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.attn = transformer.final_attn_token_to_image
        self.norm = transformer.norm_final_attn

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Stream:
        q, k = queries + query_pe, keys + key_pe
        return self.norm(queries + self.attn(q=q, k=k, v=keys)), keys
