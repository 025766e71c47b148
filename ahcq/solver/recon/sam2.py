"""Block reconstruction of a calibrated SAM2 predictor along the quantized chain, as the AHCQ-SAM SAM2 code.

Units (``sam2_units``, the reference's list and order): per Hiera block its attention, MLP and stage
projection; the FPN neck; per memory-attention layer its self-attention, cross-attention, ``linear1`` and
``linear2``; the memory encoder's mask downsampler, pixel projection, each fuser block and output projection;
per two-way layer of the mask decoder its self-attention, token→image attention, MLP and image→token
attention, then the final attention. ``recon.units: layers`` takes whole Hiera blocks, whole memory-attention
layers and whole two-way layers instead.

Tracking feeds every component from the ones before it and from memories of earlier frames, so a unit's
inputs are recorded by tracking the calibration clips twice per unit: once with the whole predictor
quantized (the units before it reconstructed, the ones after it on round-to-nearest weights) for its
quantized inputs, once with ``api.quantization_disabled`` (the original float model, before any ACNR) for
its float inputs and targets. Every call while tracking is one sample; the prompt frames are tracked too.
The unit is then trained by the generic loop (``train.reconstruct_unit``) and hardened. With
``state_dir`` the predictor is saved after every unit and an interrupted run resumes after the last one.
``recon.act_quant: false`` (BRECQ's reference) keeps every activation quantizer off while the units are
captured and trained (the quantized chain then differs from the float one by its weights only) and switches
them on at the end, as the image engine does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sam2.modeling.sam.transformer import TwoWayAttentionBlock
from torch import nn

from ahcq.progress import progress_bar
from ahcq.quantization import api
from ahcq.quantization.config import ReconUnits
from ahcq.quantization.quantizers import AdaRoundQuantizer, Mode
from ahcq.seeding import seed_everything
from ahcq.solver.recon.capture import module_device, to_device
from ahcq.solver.recon.engine import harden_outside
from ahcq.solver.recon.sam_units import Part
from ahcq.solver.recon.settings import ReconSettings
from ahcq.solver.recon.state import load_state, save_state
from ahcq.solver.recon.train import UnitReport, reconstruct_unit
from ahcq.solver.recon.units import Inputs, ReconUnit
from ahcq.video.calibration import CalibrationClip, detached, track_clip
from ahcq.video.propagation import DEFAULT_TRACKING, TrackOptions

logger = logging.getLogger(__name__)

__all__ = ["VideoUnit", "reconstruct_sam2", "reconstruct_video", "record_calls", "sam2_units", "tracking",
           "unit_samples"]

Record = tuple[Inputs, Any]


@dataclass
class VideoUnit:
    """A reconstruction unit and the predictor submodule whose calls are its samples (``hooked``; the unit's
    module wraps it when only part of its output is compared)."""

    unit: ReconUnit
    hooked: nn.Module


class _NeckLevels(nn.Module):
    """The FPN neck's feature maps as a tuple (its positional encodings carry no quantizer)."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(self.neck(*args, **kwargs)[0])


def _has_quantizers(module: nn.Module) -> bool:
    return next(api.iter_quantizers(module), None) is not None


def _plain(name: str, module: nn.Module, feature_axis: int = -1) -> VideoUnit:
    return VideoUnit(ReconUnit(name, module, feature_axis=feature_axis), module)


def _parts(prefix: str, parent: nn.Module, parts: Sequence[str], feature_axis: int = -1) -> list[VideoUnit]:
    return [_plain(f"{prefix}.{p}", getattr(parent, p), feature_axis) for p in parts
            if isinstance(getattr(parent, p, None), nn.Module)]


def _layer_outputs(module: nn.Module) -> tuple[int, ...] | None:
    return (0, 1) if isinstance(module, TwoWayAttentionBlock) else None


def sam2_units(predictor: nn.Module, units: ReconUnits = ReconUnits.BLOCKS) -> list[VideoUnit]:
    """The reconstruction units of a quantized SAM2 predictor in the reference's order (those holding a
    quantizer); ``ReconUnits.LAYERS`` takes whole Hiera blocks, memory-attention and two-way layers,
    ``BLOCKS`` their sub-blocks (SAM2 has no stages)."""
    if units is ReconUnits.STAGES:
        raise ValueError("recon.units 'stages' is not defined for SAM2; use 'blocks' or 'layers'")
    whole_layers = units is ReconUnits.LAYERS
    out: list[VideoUnit] = []
    trunk = predictor.image_encoder.trunk
    for i, block in enumerate(trunk.blocks):
        name = f"image_encoder.trunk.blocks.{i}"
        out += [_plain(name, block)] if whole_layers else _parts(name, block, ("attn", "mlp", "proj"))
    neck = predictor.image_encoder.neck
    levels = len(neck.convs)
    out.append(VideoUnit(ReconUnit("image_encoder.neck", _NeckLevels(neck), output=tuple(range(levels)),
                                     feature_axis=1), neck))
    for i, layer in enumerate(predictor.memory_attention.layers):
        name = f"memory_attention.layers.{i}"
        parts = ("self_attn", "cross_attn_image", "linear1", "linear2")
        out += [_plain(name, layer)] if whole_layers else _parts(name, layer, parts)
    encoder = predictor.memory_encoder
    out += _parts("memory_encoder", encoder, ("mask_downsampler", "pix_feat_proj"), feature_axis=1)
    out += [_plain(f"memory_encoder.fuser.layers.{i}", block, 1)
              for i, block in enumerate(encoder.fuser.layers)]
    out += _parts("memory_encoder", encoder, ("out_proj",), feature_axis=1)
    transformer = predictor.sam_mask_decoder.transformer
    for i, layer in enumerate(transformer.layers):
        name = f"sam_mask_decoder.transformer.layers.{i}"
        if whole_layers:
            out.append(VideoUnit(ReconUnit(name, layer, output=_layer_outputs(layer)), layer))
        else:
            out += _parts(name, layer, [part.attr for part in Part])
    out.append(_plain("sam_mask_decoder.transformer.final_attn_token_to_image",
                      transformer.final_attn_token_to_image))
    return [u for u in out if _has_quantizers(u.unit.module)]


@contextmanager
def _rounded_to_nearest(quantizers: Sequence[AdaRoundQuantizer]) -> Iterator[None]:
    """Not-yet-reconstructed AdaRound weights evaluate as round-to-nearest (their initial hard bits) while
    the quantized chain runs, as the reference's uninitialised AdaRound does; they stay soft afterwards."""
    soft = [q for q in quantizers if not q.is_hard]
    for q in soft:
        q.hard.fill_(True)
        q.clear_cache()
    try:
        yield
    finally:
        for q in soft:
            q.hard.fill_(False)
            q.clear_cache()


def tracking(predictor: nn.Module, clips: Sequence[CalibrationClip],
             options: TrackOptions = DEFAULT_TRACKING) -> Callable[[], None]:
    """The calibration forward of the video path: track every clip."""
    def drive() -> None:
        for clip in clips:
            track_clip(predictor, clip, options)
    return drive


def record_calls(hooked: nn.Module, drive: Callable[[], None], outputs: bool) -> list[Record]:
    """``((args, kwargs), output)`` of every call of ``hooked`` while ``drive`` runs the calibration data
    through the model in its current state (outputs only when asked)."""
    calls: list[Record] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append(((detached(args), detached(kwargs)), detached(output) if outputs else None))

    handle = hooked.register_forward_hook(hook, with_kwargs=True)
    try:
        drive()
    finally:
        handle.remove()
    return calls


def unit_samples(model: nn.Module, video_unit: VideoUnit, drive: Callable[[], None]
                 ) -> tuple[list[Inputs], list[Inputs], list[list[torch.Tensor]]]:
    """Quantized inputs, float inputs and float targets of every call of the unit."""
    unit = video_unit.unit
    adarounds = [q for _, q in api.iter_quantizers(model) if isinstance(q, AdaRoundQuantizer)]
    with _rounded_to_nearest(adarounds):
        quant = record_calls(video_unit.hooked, drive, outputs=False)
    with api.quantization_disabled(model):
        floats = record_calls(video_unit.hooked, drive, outputs=True)
    if len(quant) != len(floats) or not quant:
        raise RuntimeError(f"unit {unit.name!r}: ran {len(floats)} times in float but {len(quant)} times "
                           "quantized; reconstruction needs the same calls in both")
    return [q for q, _ in quant], [f for f, _ in floats], _targets(video_unit, floats)


def _targets(video_unit: VideoUnit, floats: list[Record]) -> list[list[torch.Tensor]]:
    unit = video_unit.unit
    if unit.module is video_unit.hooked:
        return [unit.select(out) for _, out in floats]
    return [unit.select(tuple(out[0])) for _, out in floats]


def _batcher(qin: list[Inputs], fin: list[Inputs], targets: list[list[torch.Tensor]], device: torch.device,
             batch_size: int, name: str) -> Callable[[torch.Generator], tuple]:
    if batch_size != 1:
        raise ValueError(f"unit {name!r}: SAM2 reconstruction takes one recorded call per step (calls differ "
                         f"in shape); recon.batch_size must be 1, not {batch_size}")

    def batch(generator: torch.Generator) -> tuple:
        i = int(torch.randint(len(qin), (), generator=generator))
        return [(i, 0)], to_device(qin[i], device), to_device(fin[i], device), to_device(targets[i], device)
    return batch


def _release_inference_tensors(module: nn.Module) -> None:
    """Replace plain tensor attributes created under ``inference_mode`` by normal copies.

    Tracking runs under ``inference_mode``; a module that caches a tensor there (sam2's RoPE attention
    recomputes its frequencies for a new feature size) would otherwise make reconstruction's backward fail.
    """
    for m in module.modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_inference():
                setattr(m, key, value.clone())


def reconstruct_video(predictor: nn.Module, settings: ReconSettings, clips: Sequence[CalibrationClip],
                      options: TrackOptions = DEFAULT_TRACKING, *, units: ReconUnits = ReconUnits.BLOCKS,
                      state_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Reconstruct the calibrated ``predictor`` unit by unit along the tracking of ``clips`` (see the module
    docstring); a JSON-able report with the unit reports and where the run resumed."""
    return reconstruct_sam2(predictor, settings, tracking(predictor, clips, options), units=units,
                            state_dir=state_dir, progress=progress)


def reconstruct_sam2(predictor: nn.Module, settings: ReconSettings, drive: Callable[[], None], *,
                     units: ReconUnits = ReconUnits.BLOCKS, state_dir: str | Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Reconstruct the calibrated SAM2 ``predictor`` unit by unit, each unit's samples being its calls while
    ``drive`` runs the calibration data (clips tracked, or box-prompted images); units without a quantizer
    (those kept float) are skipped."""
    video_units = sam2_units(predictor, units)
    names = [v.unit.label for v in video_units]
    seed_everything(settings.seed)
    resumed = 0
    if state_dir is not None:
        resumed = load_state(state_dir, predictor, names, settings) or 0
        if resumed:
            logger.info("reconstruction: resuming at unit %d of %d (%s)", resumed + 1, len(names),
                        names[min(resumed, len(names) - 1)])
    api.set_mode(predictor, Mode.QUANTIZE)
    harden_outside(predictor, [v.unit for v in video_units])
    reports: list[UnitReport] = []
    # BRECQ's reference (act_quant false): activations float while the units capture and train, on after
    floats = api.activations_off(predictor) if not settings.act_quant else nullcontext()
    with floats:
        for k in progress_bar(range(resumed, len(video_units)), desc="reconstruction", disable=not progress,
                              initial=resumed, total=len(video_units)):
            video_unit = video_units[k]
            unit = video_unit.unit
            qin, fin, targets = unit_samples(predictor, video_unit, drive)
            _release_inference_tensors(unit.module)
            batch = _batcher(qin, fin, targets, module_device(unit.module), settings.batch_size, unit.name)
            reports.append(reconstruct_unit(unit, k, settings, batch, progress=progress))
            if state_dir is not None:
                save_state(state_dir, predictor, k + 1, names, settings)
    api.assert_fully_quantized(predictor)
    return {"granularity": units.value, "unit_names": names,
            "units": [r.record() for r in reports], "resumed_at": resumed}
