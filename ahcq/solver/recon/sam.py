"""Block reconstruction of a calibrated, quantized SAM: the unit chain handed to the generic engine.

``recon.units: blocks`` (BRECQ / QDrop / PTQ4SAM / AHCPTQ granularity): each encoder block's attention and
MLP sub-block, the neck, each two-way layer's four sub-blocks and the final token->image attention (see
``sam_units`` for each unit's exact input and output). ``recon.units: layers`` (AHCQ-SAM): each whole
encoder block, the neck, each whole two-way layer and the final attention. ``recon.units: stages``
(SAQ-SAM): encoder stages closed by global-attention blocks, the neck, whole two-way layers and the final
attention (trained ``FINAL_ITERS_FACTOR`` times longer). With ``par.enabled`` a stage is compared after
layer skipping, on the image-token output of the float neck and float two-way transformer for the image's
prompts (PAR only, as the reference), and a decoder layer on ``beta * (query_weight * rec(queries) +
rec(keys)) + alpha * PAR`` with PAR on the token output of the rest of the transformer run in float.
Targets are those of the original float model (the engine's convention), where SAQ-SAM takes them from a
copy whose earlier stages are already quantized.

The pipeline's ``forward`` decodes boxes chunk by chunk, so decoder units would run several times per
image; the engine needs each unit once per sample, so this module runs its own chain (encoder input ->
units -> two-way transformer) over at most ``max_boxes`` boxes per image (a seeded subset, recorded).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ahcq.quantization.api import iter_quantizers, quantization_disabled
from ahcq.quantization.config import QConfig, ReconUnits
from ahcq.seeding import stream
from ahcq.solver.recon.engine import reconstruct
from ahcq.solver.recon.sam_units import (
    DecoderLayerUnit,
    DecoderPart,
    EncoderAttnUnit,
    EncoderMlpUnit,
    EncoderStageUnit,
    FinalAttnUnit,
    NeckUnit,
    Part,
    Prompted,
    decoder_inputs,
    encoder_stages,
)
from ahcq.solver.recon.settings import ReconSettings
from ahcq.solver.recon.train import GradSync, UnitReport
from ahcq.solver.recon.units import Inputs, ReconUnit

__all__ = ["BLOCKS_MAX_BOXES", "FINAL_ITERS_FACTOR", "SamChain", "box_cap", "prepare_samples",
           "reconstruct_sam", "sam_chain"]

BLOCKS_MAX_BOXES = 32
FINAL_ITERS_FACTOR = 5


def _first_feed(prev: Any, own: Inputs) -> Inputs:
    """The previous stream (first element of a tuple output) replaces the first argument."""
    args, kwargs = own
    return (prev[0] if isinstance(prev, tuple) else prev, *args[1:]), kwargs


def _stream_feed(prev: Any, own: Inputs) -> Inputs:
    """``(queries, keys)`` of the previous decoder unit replace the first two arguments."""
    args, kwargs = own
    return (prev[0], prev[1], *args[2:]), kwargs


def _embedding_feed(sam: Sam) -> Callable[[Any, Inputs], Inputs]:
    """Neck output -> keys of the first decoder unit, as ``MaskDecoder.predict_masks`` builds them."""
    def feed(prev: torch.Tensor, own: Inputs) -> Inputs:
        args, kwargs = own
        dense = sam.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).to(prev.device)
        keys = (torch.repeat_interleave(prev, args[0].shape[0], dim=0) + dense).flatten(2).permute(0, 2, 1)
        return (args[0], keys, *args[2:]), kwargs
    return feed


class SamChain:
    """The units of one SAM in forward order and the forward that runs the model along them."""

    def __init__(self, sam: Sam, encoder: list[ReconUnit], decoder: list[ReconUnit], par: bool) -> None:
        self.sam, self.encoder, self.decoder, self.par = sam, encoder, decoder, par

    @property
    def units(self) -> list[ReconUnit]:
        return [*self.encoder, *self.decoder]

    def embedding(self, p: Prompted) -> torch.Tensor:
        """Image embedding: through the encoder units, else the given float embedding or float encoder."""
        enc = self.sam.image_encoder
        if not self.encoder:
            if p.embedding is not None:
                return p.embedding
            with quantization_disabled(enc):
                return enc(p.image)
        x = enc.patch_embed(p.image)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for unit in self.encoder:
            staged = self.par and isinstance(unit.module, EncoderStageUnit)
            out = unit.module(x, p.tokens, p.dense, p.image_pe) if staged else unit.module(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def __call__(self, model: nn.Module, p: Prompted) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys at the end of the two-way transformer (``model`` is the SAM itself)."""
        queries, keys, query_pe, key_pe = decoder_inputs(self.embedding(p), p)
        for unit in self.decoder:
            queries, keys = unit.module(queries, keys, query_pe, key_pe)[:2]
        return queries, keys


def sam_chain(sam: Sam, qconfig: QConfig, par: bool | None = None) -> SamChain:
    """Units per ``qconfig.recon.units`` (encoder units only when the encoder holds quantizers).

    ``par`` (default ``par.enabled`` with stages): PAR's float tails; without them each module of the model
    runs exactly once per forward of the chain.
    """
    stages, whole = qconfig.recon.units is ReconUnits.STAGES, qconfig.recon.units is ReconUnits.LAYERS
    par = stages and (qconfig.par.enabled if par is None else par)
    iters_cams = qconfig.recon.iters_cams if qconfig.recon.iters_cams != qconfig.recon.iters else None
    enc, transformer = sam.image_encoder, sam.mask_decoder.transformer
    encoder: list[ReconUnit] = []
    if next(iter_quantizers(enc), None) is not None:
        if stages:
            for idx in encoder_stages(enc.blocks):
                module = EncoderStageUnit([enc.blocks[i] for i in idx], sam if par else None)
                name = f"image_encoder.blocks.{idx[0]}-{idx[-1]}"
                encoder.append(ReconUnit(name, module, output=1 if par else None, feed=_first_feed,
                                         iters=iters_cams or None))
        elif whole:
            encoder += [ReconUnit(f"image_encoder.blocks.{i}", block) for i, block in enumerate(enc.blocks)]
        else:
            for i, block in enumerate(enc.blocks):
                encoder.append(ReconUnit(f"image_encoder.blocks.{i}.attn", EncoderAttnUnit(block)))
                encoder.append(ReconUnit(f"image_encoder.blocks.{i}.mlp", EncoderMlpUnit(block)))
        encoder.append(ReconUnit("image_encoder.neck", NeckUnit(enc.neck), feature_axis=1, feed=_first_feed))
    decoder: list[ReconUnit] = []
    p = qconfig.par
    for j, layer in enumerate(transformer.layers):
        name = f"mask_decoder.transformer.layers.{j}"
        if stages or whole:
            module = DecoderLayerUnit(layer, transformer if par else None)
            weights = (p.beta * p.query_weight, p.beta, p.alpha) if par else None
            decoder.append(ReconUnit(name, module, output=(0, 1, 2) if par else (0, 1), feed=_stream_feed,
                                     weights=weights))
            continue
        for part in Part:
            decoder.append(ReconUnit(f"{name}.{part.attr}", DecoderPart(layer, part), output=part.stream,
                                     feed=_stream_feed))
    final = qconfig.recon.iters * FINAL_ITERS_FACTOR if stages else None
    decoder.append(ReconUnit("mask_decoder.transformer.final_attn_token_to_image", FinalAttnUnit(transformer),
                             output=0, feed=_stream_feed, iters=final))
    if encoder:
        decoder[0].feed = _embedding_feed(sam)
    return SamChain(sam, encoder, decoder, par)


def box_cap(qconfig: QConfig, par: bool, max_boxes: int | None = None) -> int:
    """Boxes per calibration image that reconstruction uses: ``par.max_prompts`` with PAR (SAQ-SAM's 16),
    else ``BLOCKS_MAX_BOXES``; ``max_boxes`` (the run's ``--calib-max-boxes``) caps it further."""
    cap = qconfig.par.max_prompts if par else BLOCKS_MAX_BOXES
    return cap if max_boxes is None else min(cap, max_boxes)


def _boxes(sample: Any) -> torch.Tensor:
    return sample.cached.sample.prompts.boxes


@torch.no_grad()
def prepare_samples(sam: Sam, samples: Sequence[Any], max_boxes: int | None, seed: int, device: torch.device,
                    use_embedding: bool) -> tuple[list[Prompted], list[int]]:
    """Prompt tokens of at most ``max_boxes`` boxes per image (a seeded subset, in the given order; ``None``:
    all) and the encoder input (or the float embedding); images without boxes are left out. Also the kept
    box counts."""
    decoder, transform = sam.mask_decoder, ResizeLongestSide(sam.image_encoder.img_size)
    prepared, kept = [], []
    for i, sample in enumerate(samples):
        boxes, image = _boxes(sample), sample.cached.sample.image
        if max_boxes is not None and len(boxes) > max_boxes:
            order = torch.randperm(len(boxes), generator=stream(seed, "recon-boxes", i))
            boxes = boxes[order[:max_boxes].sort().values]
        kept.append(len(boxes))
        if len(boxes) == 0:
            continue
        sparse, dense = sam.prompt_encoder(points=None, masks=None, boxes=transform.apply_boxes_torch(
            boxes.to(device, torch.float32), image.original_size))
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(len(boxes), -1, -1), sparse), dim=1)
        embedding = sample.embedding.to(device) if use_embedding and sample.embedding is not None else None
        prepared.append(Prompted(image.tensor.to(device), embedding, tokens, dense,
                                 sam.prompt_encoder.get_dense_pe()))
    if not prepared:
        raise ValueError("reconstruct_sam: no calibration image has a box prompt")
    return prepared, kept


def reconstruct_sam(
    sam: Sam,
    samples: Sequence[Any],
    qconfig: QConfig,
    *,
    device: torch.device | str | None = None,
    max_boxes: int | None = None,
    state_dir: str | Path | None = None,
    max_cache_gb: float = 8.0,
    on_unit_end: Callable[[int, ReconUnit, UnitReport], None] | None = None,
    progress: bool = True,
    sync: GradSync | None = None,
) -> dict[str, Any]:
    """Reconstruct the calibrated ``sam`` on ``samples`` (``image_ptq.CalibSample``); a JSON-able report.

    ``max_boxes`` caps the boxes per image further (``box_cap``). ``state_dir`` makes the run resumable.
    ``sync``: this process is one data-parallel rank holding its share of the samples (``engine``).
    On return every quantizer is calibrated, in QUANTIZE mode and every AdaRound is hard.
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else sam.device
    chain, p = sam_chain(sam, qconfig), qconfig.par
    cap = box_cap(qconfig, chain.par, max_boxes)
    prepared, kept = prepare_samples(sam, samples, cap, qconfig.seed, device, use_embedding=not chain.encoder)
    settings = ReconSettings.from_qconfig(qconfig)
    result = reconstruct(sam, chain.units, prepared, settings, chain, max_cache_gb=max_cache_gb,
                         state_dir=state_dir, on_unit_end=on_unit_end, progress=progress, sync=sync)
    return {
        "granularity": qconfig.recon.units.value,
        "par": {"alpha": p.alpha, "beta": p.beta, "query_weight": p.query_weight} if chain.par else None,
        "max_boxes": cap,
        "boxes_per_image": kept,
        "iters": settings.iters,
        "drop_prob": settings.drop_prob,
        "unit_names": [u.label for u in chain.units],
        "units": [r.record() for r in result.reports],
        "resumed_at": result.resumed_at,
        "peak_cache_bytes": result.peak_cache_bytes,
        "spilled_bytes": result.spilled_bytes,
        "seconds": round(time.perf_counter() - start, 3),
    }
