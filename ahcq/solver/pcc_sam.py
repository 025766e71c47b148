"""Perceptual-consistency clipping (SAQ-SAM PCC) of SAM's decoder attentions, after calibration.

For every quantized attention of the two-way transformer, four ranges are re-chosen: the inputs of
``q_proj`` and ``k_proj`` and their outputs (the twin's ``q``/``k`` slots), greedily in that order, by the
percentile clipping whose fake-quantized attention map overlaps the float one best. As in SAQ-SAM's code:

* the data are the first ``pcc.calib`` calibration images with all their boxes (the reference uses one);
* the target of each attention is its map in the float model on float inputs; its candidates are computed
  on the inputs it receives with the PCC points of the attentions before it already quantized (every other
  quantizer off), so each attention compensates what the earlier ones clip;
* ``pcc.passes`` sweeps over all attentions (2: the second pass re-searches every point with the other
  three quantized).

The ranges are written into the (per-tensor uniform) quantizers; others (CAG, per-channel) are left as
calibrated and reported. It runs after ``calibrate`` (whose finalize would overwrite the ranges) and before
reconstruction, which goes on learning the LSQ scales from there.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from segment_anything.modeling import Sam
from torch import Tensor

from ahcq.models.sam_attention import QuantDecoderAttention
from ahcq.quantization.api import quantization_disabled
from ahcq.quantization.config import QConfig
from ahcq.quantization.granularity import PerTensor
from ahcq.quantization.primitives import qparams_from_minmax
from ahcq.quantization.quantizers import Mode, Quantizer, UniformQuantizer
from ahcq.quantization.transforms.pcc import ClipResult, search_clip_sequential
from ahcq.solver.recon.sam import prepare_samples
from ahcq.solver.recon.sam_units import Prompted

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


@torch.no_grad()
def _prompted(sam: Sam, qconfig: QConfig, samples: Sequence[Any], device: torch.device) -> list[Prompted]:
    """The PCC images with all their boxes, each with its float image embedding (PCC changes nothing in the
    encoder, so it is computed once)."""
    prepared, _ = prepare_samples(sam, samples[: qconfig.pcc.calib], None, qconfig.seed, device,
                                  use_embedding=True)
    out = []
    for p in prepared:
        if p.embedding is None:
            with quantization_disabled(sam.image_encoder):
                p.embedding = sam.image_encoder(p.image)
        out.append(p)
    return out


@torch.no_grad()
def _capture(sam: Sam, prompted: Sequence[Prompted], attentions: list[tuple[str, QuantDecoderAttention]],
             active: Sequence[Quantizer]) -> dict[str, tuple[Tensor, Tensor]]:
    """``(q, k)`` inputs of each attention, the images' boxes pooled, with every quantizer off except
    ``active`` (quantizing)."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in attentions}

    def hook(name: str) -> Callable:
        def record(_m: Any, _args: tuple, kwargs: dict) -> None:
            seen[name].append((kwargs["q"].detach(), kwargs["k"].detach()))
        return record

    transformer = sam.mask_decoder.transformer
    with ExitStack() as stack:
        for name, attn in attentions:
            stack.callback(attn.register_forward_pre_hook(hook(name), with_kwargs=True).remove)
        stack.enter_context(quantization_disabled(sam))
        for q in active:
            q.set_mode(Mode.QUANTIZE)
        for p in prompted:
            n = len(p.tokens)
            src = torch.repeat_interleave(p.embedding, n, dim=0) + p.dense
            transformer(src, torch.repeat_interleave(p.image_pe, n, dim=0), p.tokens)
    return {n: (torch.cat([q for q, _ in v]), torch.cat([k for _, k in v])) for n, v in seen.items()}


def _settable(q: Any) -> bool:
    return isinstance(q, UniformQuantizer) and q.granularity == PerTensor() and not q.symmetric


def _set_range(q: Quantizer, lo: float, hi: float) -> None:
    scale, zero_point = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), q.bits, symmetric=False)
    q.scale.data = scale.to(q.scale.device, torch.float32).reshape(q.scale.shape).clone()
    q.zero_point = zero_point.round().to(q.zero_point.device, torch.int32).reshape(q.zero_point.shape)
    q.clear_cache()


def _skip_reason(quantizers: list[Any]) -> str | None:
    fixed = [path for path, q in zip(PCC_POINTS, quantizers) if not _settable(q)]
    if fixed:
        return f"not per-tensor asymmetric uniform: {', '.join(fixed)}"
    if len({q.bits for q in quantizers}) > 1:
        return "the four quantizers have different bit widths"
    return None


@torch.no_grad()
def apply_pcc(sam: Sam, samples: Sequence[Any], qconfig: QConfig, device: torch.device | str | None = None
              ) -> dict[str, Any]:
    """Re-choose the PCC ranges of the calibrated ``sam``; ``{attention: {point: percentile | note}}``."""
    device = torch.device(device) if device is not None else sam.device
    cfg = qconfig.pcc
    attentions = decoder_attentions(sam)
    prompted = _prompted(sam, qconfig, samples, device)
    floats = _capture(sam, prompted, attentions, active=())
    points = {name: [_point(attn, path) for path in PCC_POINTS] for name, attn in attentions}
    report: dict[str, Any] = {name: {"skipped": reason} for name, _ in attentions
                              if (reason := _skip_reason(points[name])) is not None}
    chosen: dict[str, list[ClipResult]] = {}
    for _ in range(cfg.passes):
        for name, attn in attentions:
            if name in report:
                continue
            active = [q for done in chosen for q in points[done]]
            inputs = floats if not active else _capture(sam, prompted, attentions, active)
            with quantization_disabled(attn):
                reference = _attention_map(attn, *floats[name])([lambda x: x] * len(PCC_POINTS))
                results = search_clip_sequential(
                    _attention_map(attn, *inputs[name]), len(PCC_POINTS), reference, cfg.percentiles,
                    points[name][0].bits, cfg.threshold, initial=chosen.get(name))
            for q, r in zip(points[name], results):
                _set_range(q, r.lo, r.hi)
            chosen[name] = results
    for name, results in chosen.items():
        report[name] = {path: {"percentile": r.percentile, "distance": r.distance}
                        for path, r in zip(PCC_POINTS, results)}
    return {name: report[name] for name, _ in attentions}
