"""The PTQ recipe's view of a box-prompted image model (``ahcq.solver.ptq.PTQModel``): SAM, or SAM2 run as
``SAM2ImagePredictor`` runs it. A calibration sample is one cached image with its first boxes.

SAM keeps its own machinery (BIG on the token->image attentions, SAQ-SAM's PCC, reconstruction on SAM's
units). SAM2 is quantized by the SAM2 role map with its memory modules float (an image never reaches them),
BIG on the SAM2 role map's sites, and reconstruction on the SAM2 units along the quantized chain of the
calibration images; it has no PCC (SAQ-SAM defines it on SAM's decoder only).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sam2.modeling.sam2_base import SAM2Base

from ahcq.deploy.onnx_export import OnnxExportError, check_exportable
from ahcq.models.image_runner import Embedding, PromptedModel, decode_boxes, encode, is_sam2
from ahcq.models.sam2 import quantize_sam2
from ahcq.models.sam2_image import IMAGE_KEEP_FLOAT
from ahcq.models.sam2_roles import sam2_big_sites
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_roles import big_sites
from ahcq.quantization.config import QConfig
from ahcq.solver.calibration import BIG_IMAGES
from ahcq.solver.cli import UserError
from ahcq.solver.feature_cache import CachedImage
from ahcq.solver.pcc_sam import apply_pcc
from ahcq.solver.ptq import PTQModel
from ahcq.solver.ranks import SINGLE, Ranks
from ahcq.solver.recon.sam import reconstruct_sam
from ahcq.solver.recon.sam2 import reconstruct_sam2
from ahcq.solver.recon.settings import ReconSettings

__all__ = ["CalibSample", "image_ptq", "sam2_image_ptq", "sam_forward", "sam_ptq"]


@dataclass
class CalibSample:
    """A calibration image: cached encoder input and boxes (and float embedding when the encoder is float)."""

    cached: CachedImage
    embedding: Embedding | None


def sam_forward(sam: PromptedModel, sample: CalibSample, box_chunk: int, max_boxes: int) -> None:
    """Run ``sam`` (encoder unless its float embedding is given, then decoder over the boxes) on a sample."""
    image = sample.cached.sample.image
    embedding = encode(sam, image) if sample.embedding is None else sample.embedding
    decode_boxes(sam, embedding, image, sample.cached.sample.prompts.boxes[:max_boxes], box_chunk)


def sam_ptq(sam: Any, *, quant_encoder: bool, box_chunk: int, max_boxes: int, device: torch.device,
            exportable: bool = False, ranks: Ranks = SINGLE) -> PTQModel:
    """SAM in the PTQ recipe: ``max_boxes`` prompts per calibration image (decoded ``box_chunk`` at a time)
    for calibration and reconstruction; BIG on SAM's token->image attentions over ``BIG_IMAGES`` images.
    ``exportable``: refuse, before calibrating, a recipe whose quantizers ONNX cannot express. With several
    ``ranks`` calibration runs alike on every rank and reconstruction is data-parallel over the images."""
    def quantize(qconfig: QConfig) -> None:
        quantize_sam(sam, qconfig, quant_encoder=quant_encoder)
        if exportable:
            try:
                check_exportable(sam)
            except OnnxExportError as err:
                raise UserError(f"--backend onnxruntime: {err}") from None

    return PTQModel(
        model=sam,
        quantize=quantize,
        forward=functools.partial(sam_forward, sam, box_chunk=box_chunk, max_boxes=max_boxes),
        big_sites=lambda: big_sites(sam),
        big_samples=BIG_IMAGES,
        pcc=lambda samples, qconfig: apply_pcc(sam, samples, qconfig, device),
        reconstruct=lambda samples, qconfig, state_dir: reconstruct_sam(
            sam, ranks.shard(samples), qconfig, device=device, state_dir=state_dir, max_boxes=max_boxes,
            sync=ranks.average if ranks.world > 1 else None),
    )


def sam2_image_ptq(model: SAM2Base, *, quant_encoder: bool, box_chunk: int, max_boxes: int) -> PTQModel:
    """SAM2 on box-prompted images in the PTQ recipe (see the module docstring)."""
    keep_float = IMAGE_KEEP_FLOAT if quant_encoder else (*IMAGE_KEEP_FLOAT, "image_encoder")
    forward = functools.partial(sam_forward, model, box_chunk=box_chunk, max_boxes=max_boxes)

    def reconstruct(samples: Sequence[CalibSample], qconfig: QConfig, state_dir: Path | None) -> dict:
        def drive() -> None:
            for sample in samples:
                forward(sample)
        return reconstruct_sam2(model, ReconSettings.from_qconfig(qconfig), drive, units=qconfig.recon.units,
                                state_dir=state_dir)

    return PTQModel(
        model=model,
        quantize=lambda qconfig: quantize_sam2(model, qconfig, keep_float),
        forward=forward,
        big_sites=lambda: sam2_big_sites(model),
        big_samples=BIG_IMAGES,
        reconstruct=reconstruct,
    )


def image_ptq(model: PromptedModel, *, quant_encoder: bool, box_chunk: int, max_boxes: int,
              device: torch.device, exportable: bool = False, ranks: Ranks = SINGLE) -> PTQModel:
    """The PTQ view of ``model``, by its family (SAM2's reconstruction is not data-parallel yet: refused
    with several ``ranks``)."""
    if is_sam2(model):
        if ranks.world > 1:
            raise UserError("SAM2 under torchrun: its reconstruction is not data-parallel yet; run it in one "
                            "process")
        return sam2_image_ptq(model, quant_encoder=quant_encoder, box_chunk=box_chunk, max_boxes=max_boxes)
    return sam_ptq(model, quant_encoder=quant_encoder, box_chunk=box_chunk, max_boxes=max_boxes,
                   device=device, exportable=exportable, ranks=ranks)
