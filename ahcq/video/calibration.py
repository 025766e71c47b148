"""Calibration data for SAM2 PTQ: N seeded videos, each tracked K frames past its first prompt frame.

Calibration follows the AHCQ-SAM SAM2 protocol: the model sees what it sees at evaluation (GT mask prompts,
memories of the previous frames, object pointers), so every quantizer, including those of the memory
attention and memory encoder, observes real tracking activations. ``track_clip`` is the one forward over a
clip: ``calibrate`` runs it with every quantizer calibrating, ``apply_big_sam2`` (the SAM pipeline's
``apply_big`` on the SAM2 sites) with hooks on the BIG key projections, and ``record_calls`` with a hook
that keeps the float inputs of every call of a submodule. The last is how ``reconstruct_video`` feeds the
generic reconstruction engine, which needs a unit to run once per sample, while tracking runs each
component once per frame and object: every recorded call is a sample.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ahcq.models.sam2_roles import sam2_big_sites
from ahcq.quantization import api
from ahcq.quantization.config import QConfig
from ahcq.solver.calibration import apply_big
from ahcq.solver.reconstruction import ReconSettings, reconstruct, units_from_names
from ahcq.solver.seeding import calibration_indices
from ahcq.video.datasets import VideoSample
from ahcq.video.propagation import DEFAULT_TRACKING, TrackOptions, track_sample

__all__ = [
    "CalibrationClip", "apply_big_sam2", "calibrate", "reconstruct_video", "record_calls", "select_clips",
    "track_clip",
]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class CalibrationClip:
    """One calibration video: its first prompt frame plus ``frames`` tracked frames after it."""

    sample: VideoSample
    frames: int


def select_clips(samples: Sequence[VideoSample], n_videos: int, k_frames: int, seed: int
                 ) -> list[CalibrationClip]:
    """``n_videos`` distinct videos drawn with ``seed`` (dataset order), each tracked ``k_frames`` frames."""
    if k_frames < 1:
        raise ValueError(f"calibration needs at least 1 tracked frame per video (memory attention and "
                         f"mask decoder run only on tracked frames), got {k_frames}")
    if not 0 < n_videos <= len(samples):
        raise ValueError(f"cannot draw {n_videos} calibration videos from a dataset of {len(samples)}")
    return [CalibrationClip(samples[i], k_frames) for i in calibration_indices(seed, len(samples), n_videos)]


def track_clip(predictor: nn.Module, clip: CalibrationClip, options: TrackOptions = DEFAULT_TRACKING) -> None:
    """Track one calibration clip (the forward every calibration consumer runs)."""
    track_sample(predictor, clip.sample, replace(options, max_frames=clip.frames))


def calibrate(predictor: nn.Module, clips: Sequence[CalibrationClip],
              options: TrackOptions = DEFAULT_TRACKING, progress: bool = True) -> None:
    """Observe every quantizer of ``predictor`` on the clips, then finalize them (``api.calibrating``)."""
    if not clips:
        raise ValueError("calibrate: no calibration clips")
    with api.calibrating(predictor):
        for clip in tqdm(clips, desc="calibration", unit="video", disable=not progress):
            track_clip(predictor, clip, options)


def apply_big_sam2(predictor: nn.Module, clips: Sequence[CalibrationClip], qconfig: QConfig,
                   options: TrackOptions = DEFAULT_TRACKING) -> dict[str, bool]:
    """PTQ4SAM's BIG on SAM2: ``apply_big`` on the SAM2 BIG sites; ``{attention: folded}``.

    Keys are pooled over every tracked frame of the first calibration clip (the SAM2 reference decides on
    one video as well), with every quantizer off.
    """
    return apply_big(predictor, clips[:1], lambda clip: track_clip(predictor, clip, options), qconfig,
                     sam2_big_sites(predictor))


def _detached(value: Any) -> Any:
    """A normal (autograd-capable) CPU copy of a value recorded under ``inference_mode``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def record_calls(predictor: nn.Module, module_names: Sequence[str], clips: Sequence[CalibrationClip],
                 options: TrackOptions = DEFAULT_TRACKING, progress: bool = True) -> dict[str, list[Inputs]]:
    """``(args, kwargs)`` of every call of each named submodule while tracking the clips in float."""
    modules = dict(predictor.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise KeyError(f"record_calls: the predictor has no submodule {missing}")
    calls: dict[str, list[Inputs]] = {name: [] for name in module_names}

    def hook_for(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name].append(_detached((tuple(args), dict(kwargs))))
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in module_names]
    try:
        with api.quantization_disabled(predictor):
            for clip in tqdm(clips, desc="record calibration inputs", unit="video", disable=not progress):
                track_clip(predictor, clip, options)
    finally:
        for handle in handles:
            handle.remove()
    silent = [n for n, c in calls.items() if not c]
    if silent:
        raise RuntimeError(f"record_calls: {silent} never ran while tracking the calibration clips")
    # copied again outside inference_mode, so that reconstruction can backpropagate through them
    return {name: [_detached(c) for c in cs] for name, cs in calls.items()}


def _kwarg_feed(*keys: str) -> Callable[[Any, Inputs], Inputs]:
    """Feed for layers called with keywords: the previous layer's output(s) replace ``keys``."""
    def feed(prev_output: Any, own_inputs: Inputs) -> Inputs:
        args, kwargs = own_inputs
        outputs = prev_output if isinstance(prev_output, tuple) else (prev_output,)
        return args, {**kwargs, **dict(zip(keys, outputs))}
    return feed


# component called once per frame -> (its chain of blocks, unit options); the blocks of one component feed
# each other, so the engine's float-chain check holds
RECON_COMPONENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "image_encoder": ("trunk.blocks", {}),
    "memory_attention": ("layers", {"feed": _kwarg_feed("tgt")}),
    "memory_encoder": ("fuser.layers", {"feature_axis": 1}),
    "sam_mask_decoder": ("transformer.layers", {"output": (0, 1), "feed": _kwarg_feed("queries", "keys")}),
}


def _component_units(component: nn.Module, blocks: str, options: dict[str, Any]) -> list:
    parent = component.get_submodule(blocks)
    names = [f"{blocks}.{i}" for i in range(len(parent))]
    units = units_from_names(component, names, **options)
    return [u for u in units if u.quantizers]


def _release_inference_tensors(module: nn.Module) -> None:
    """Replace plain tensor attributes created under ``inference_mode`` by normal copies.

    Tracking runs under ``inference_mode``; a module that caches a tensor there (sam2's RoPE attention
    recomputes its frequencies for a new feature size) would otherwise make reconstruction's backward fail.
    """
    for m in module.modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_inference():
                setattr(m, key, value.clone())


def _call(module: nn.Module, sample: Inputs) -> Any:
    args, kwargs = sample
    return module(*args, **kwargs)


def reconstruct_video(predictor: nn.Module, settings: ReconSettings, clips: Sequence[CalibrationClip],
                      options: TrackOptions = DEFAULT_TRACKING, progress: bool = True) -> dict[str, list]:
    """Block reconstruction of a calibrated predictor, component by component, on recorded tracking calls.

    Each component (image encoder, memory attention, memory encoder, mask decoder) is reconstructed on the
    float inputs it received in every call while tracking the clips (recorded one component at a time, so
    only one component's samples are held); the engine hardens the component's AdaRound weights and leaves
    it fully quantized. Returns the unit reports per component.
    """
    reports: dict[str, list] = {}
    for name, (blocks, unit_options) in RECON_COMPONENTS.items():
        component = predictor.get_submodule(name)
        units = _component_units(component, blocks, unit_options)
        if not units:
            continue
        samples = record_calls(predictor, [name], clips, options, progress)[name]
        _release_inference_tensors(component)
        result = reconstruct(component, units, samples, settings, forward=_call, progress=progress)
        reports[name] = result.reports
        del samples
    return reports
