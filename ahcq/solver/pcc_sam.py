"""Perceptual-consistency clipping (SAQ-SAM PCC) of SAM's decoder attentions, after calibration.

For every quantized attention of the two-way transformer, four ranges are re-chosen: the inputs of
``q_proj`` and ``k_proj`` and their outputs (the twin's ``q``/``k`` slots). The float inputs of each attention
are captured on the first ``pcc.calib`` calibration images (at most ``par.max_prompts`` boxes each, boxes
pooled), and ``search_clip_sequential`` picks, greedily in that order, the percentile clipping whose
fake-quantized attention map overlaps the float one best. The ranges are written into the (per-tensor
uniform) quantizers; others (CAG, per-channel) are left as calibrated and reported.

It runs after ``calibrate`` (whose finalize would overwrite the ranges) and before reconstruction, which
goes on learning the LSQ scales from there. Unlike the reference, each attention is searched on float
inputs, independently of the clipping chosen for the attentions before it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from segment_anything.modeling import Sam
from torch import Tensor

from ahcq.models.sam_attention import QuantDecoderAttention
from ahcq.quantization.api import quantization_disabled
from ahcq.quantization.config import QConfig
from ahcq.quantization.primitives import qparams_from_minmax
from ahcq.quantization.quantizers import CAGQuantizer, Quantizer, UniformQuantizer
from ahcq.quantization.transforms.pcc import search_clip_sequential
from ahcq.solver.recon_sam import prepare_samples, sam_chain

__all__ = ["PCC_POINTS", "apply_pcc", "decoder_attentions"]

PCC_POINTS = ("q_proj.input_quantizer", "k_proj.input_quantizer", "q_quantizer", "k_quantizer")


def decoder_attentions(sam: Sam) -> list[tuple[str, QuantDecoderAttention]]:
    """``(name, twin)`` of every attention twin inside the mask decoder's two-way transformer."""
    return [(f"mask_decoder.transformer.{n}", m) for n, m in sam.mask_decoder.transformer.named_modules()
            if isinstance(m, QuantDecoderAttention)]


def _point(attn: QuantDecoderAttention, path: str) -> Any:
    module: Any = attn
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def _attention_map(attn: QuantDecoderAttention, q_in: Tensor, k_in: Tensor) -> Callable[[Sequence], Tensor]:
    """``fns -> softmax(q kᵀ/√d)`` of ``attn`` (float weights) applying ``fns[i]`` at ``PCC_POINTS[i]``."""
    def attention(fns: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
        q = attn._separate_heads(fns[2](attn.q_proj(fns[0](q_in))))
        k = attn._separate_heads(fns[3](attn.k_proj(fns[1](k_in))))
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attention


def _capture(sam: Sam, qconfig: QConfig, samples: Sequence[Any], device: torch.device,
             attentions: list[tuple[str, QuantDecoderAttention]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Float ``(q, k)`` inputs of each attention, boxes of the first ``pcc.calib`` images pooled."""
    chain = sam_chain(sam, qconfig, par=False)
    prepared, _ = prepare_samples(sam, samples[: qconfig.pcc.calib], qconfig.par.max_prompts, qconfig.seed,
                                  device, use_embedding=not chain.encoder)
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in attentions}

    def hook(name: str) -> Callable:
        def record(_m: Any, _args: tuple, kwargs: dict) -> None:
            seen[name].append((kwargs["q"].detach(), kwargs["k"].detach()))
        return record

    handles = [a.register_forward_pre_hook(hook(n), with_kwargs=True) for n, a in attentions]
    try:
        with torch.no_grad(), quantization_disabled(sam):
            for p in prepared:
                chain(sam, p)
    finally:
        for handle in handles:
            handle.remove()
    return {n: (torch.cat([q for q, _ in v]), torch.cat([k for _, k in v])) for n, v in seen.items()}


def _settable(q: Any) -> bool:
    return (isinstance(q, UniformQuantizer) and not isinstance(q, CAGQuantizer) and q.ch_axis is None
            and not q.symmetric)


def _set_range(q: Quantizer, lo: float, hi: float) -> None:
    scale, zero_point = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), q.bits, symmetric=False)
    q.scale.data = scale.to(q.scale.device, torch.float32).reshape(q.scale.shape).clone()
    q.zero_point = zero_point.round().to(q.zero_point.device, torch.int32).reshape(q.zero_point.shape)


@torch.no_grad()
def apply_pcc(sam: Sam, samples: Sequence[Any], qconfig: QConfig, device: torch.device | str | None = None
              ) -> dict[str, Any]:
    """Re-choose the PCC ranges of the calibrated ``sam``; ``{attention: {point: percentile | note}}``."""
    device = torch.device(device) if device is not None else sam.device
    threshold = qconfig.pcc.threshold or qconfig.ptq4sam.threshold
    attentions = decoder_attentions(sam)
    inputs = _capture(sam, qconfig, samples, device, attentions)
    report: dict[str, Any] = {}
    for name, attn in attentions:
        quantizers = [_point(attn, path) for path in PCC_POINTS]
        fixed = [path for path, q in zip(PCC_POINTS, quantizers) if not _settable(q)]
        if fixed:
            report[name] = {"skipped": f"not per-tensor asymmetric uniform: {', '.join(fixed)}"}
            continue
        if len({q.bits for q in quantizers}) > 1:
            report[name] = {"skipped": "the four quantizers have different bit widths"}
            continue
        with quantization_disabled(attn):
            attention = _attention_map(attn, *inputs[name])
            reference = attention([lambda x: x] * len(PCC_POINTS))
            results = search_clip_sequential(attention, len(PCC_POINTS), reference, qconfig.pcc.percentiles,
                                             quantizers[0].bits, threshold)
        for q, r in zip(quantizers, results):
            _set_range(q, r.lo, r.hi)
        report[name] = {path: {"percentile": r.percentile, "distance": r.distance}
                        for path, r in zip(PCC_POINTS, results)}
    return report
