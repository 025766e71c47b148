"""Calibration data for SAM2 PTQ: N seeded videos, each tracked K frames past its first prompt frame.

Calibration follows the AHCQ-SAM SAM2 protocol: the model sees what it sees at evaluation (GT mask prompts,
memories of the previous frames, object pointers), so every quantizer, including those of the memory
attention and memory encoder, observes real tracking activations. ``track_clip`` is the one forward over a
clip: the PTQ recipe (``ahcq.solver.ptq``) runs it for every calibration step, and ``ahcq.solver.recon.sam2``
with a hook on one unit, whose every call while tracking is a reconstruction sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ahcq.seeding import calibration_indices
from ahcq.video.datasets import VideoSample
from ahcq.video.propagation import DEFAULT_TRACKING, TrackOptions, track_sample

__all__ = ["CalibrationClip", "detached", "select_clips", "track_clip"]


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


def detached(value: Any) -> Any:
    """A normal (autograd-capable) CPU copy of a value recorded under ``inference_mode``."""
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(False):
            return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value
