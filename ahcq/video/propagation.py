"""Semi-supervised VOS with sam2's video predictor: GT mask on each object's prompt frame, forward tracking.

The protocol is the AHCQ-SAM / SA-V one: every object gets its ground-truth mask (``add_new_mask``) on its
first annotated non-empty frame and the video is propagated forward; a pixel is foreground when the
predicted probability exceeds the threshold (0.5). An object whose prompt frame comes later is added only
when tracking reaches that frame, so no object ever sees its own future mask and, before its prompt
frame, it is predicted as absent. The predictor is wrapped, never modified: tracking runs in segments
between consecutive prompt frames through ``propagate_in_video``.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ahcq.progress import progress_bar
from ahcq.video.datasets import VideoSample

__all__ = [
    "DEFAULT_TRACKING", "FrameMasks", "TrackOptions", "TrackedPredictions", "predict_videos", "track_sample",
]

FrameMasks = dict[int, dict[int, np.ndarray]]


@dataclass(frozen=True)
class TrackOptions:
    """How one video is tracked.

    ``max_frames``: track only the first prompt frame and this many frames after it (calibration clips);
    None tracks to the end. ``offload_video`` / ``offload_state`` keep frames / memories on the CPU
    (sam2's ``init_state`` options; they save accelerator memory on long videos).
    """

    threshold: float = 0.5
    max_frames: int | None = None
    offload_video: bool = True
    offload_state: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"TrackOptions: threshold must be a probability in (0, 1), got {self.threshold}")
        if self.max_frames is not None and self.max_frames < 0:
            raise ValueError(f"TrackOptions: max_frames must be >= 0 or None, got {self.max_frames}")


DEFAULT_TRACKING = TrackOptions()


def _segments(sample: VideoSample, last: int) -> list[tuple[int, int, list[int]]]:
    """(first frame, last frame, objects prompted on the first frame) of each tracking segment."""
    starts: dict[int, list[int]] = {}
    for obj in sample.objects:
        frame = sample.prompt_frames[obj]
        if frame <= last:
            starts.setdefault(frame, []).append(obj)
    begins = sorted(starts)
    ends = [b - 1 for b in begins[1:]] + [last]
    return [(b, e, starts[b]) for b, e in zip(begins, ends)]


def _check_predictor(predictor: nn.Module, sample: VideoSample, state: dict) -> None:
    if state["num_frames"] != len(sample.frame_paths):
        raise ValueError(f"video {sample.name!r}: the predictor loaded {state['num_frames']} frames from "
                         f"{sample.frames_dir}, the dataset lists {len(sample.frame_paths)}")
    if (state["video_height"], state["video_width"]) != tuple(sample.size):
        raise ValueError(f"video {sample.name!r}: frames are {state['video_height']}x{state['video_width']}, "
                         f"the annotations {sample.size[0]}x{sample.size[1]}")


def _iter_tracked(predictor: nn.Module, sample: VideoSample, options: TrackOptions
                  ) -> Iterator[tuple[int, Sequence[int], torch.Tensor]]:
    """(frame, object ids, video-resolution mask logits) of every tracked frame, in time order."""
    state = predictor.init_state(str(sample.frames_dir), offload_video_to_cpu=options.offload_video,
                                 offload_state_to_cpu=options.offload_state)
    _check_predictor(predictor, sample, state)
    n_frames = state["num_frames"]
    first = min(sample.prompt_frames.values())
    last = n_frames - 1 if options.max_frames is None else min(n_frames - 1, first + options.max_frames)
    for begin, end, objects in _segments(sample, last):
        for obj in objects:
            frame, mask = sample.prompt(obj)
            predictor.add_new_mask(state, frame_idx=frame, obj_id=obj, mask=torch.from_numpy(mask))
        yield from predictor.propagate_in_video(state, start_frame_idx=begin,
                                                max_frame_num_to_track=end - begin)


def track_sample(predictor: nn.Module, sample: VideoSample, options: TrackOptions = DEFAULT_TRACKING,
                 keep: Collection[int] | None = None) -> FrameMasks:
    """Boolean masks ``{frame: {object: HxW}}`` of one video; objects are absent before their prompt frame.

    ``keep``: frames whose masks are returned (all tracked frames when None); every frame is still tracked.
    """
    out: FrameMasks = {}
    with torch.inference_mode(), warnings.catch_warnings():
        # sam2 warns on every frame when its optional CUDA post-processing extension is absent
        warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")
        for frame, obj_ids, logits in _iter_tracked(predictor, sample, options):
            if keep is not None and frame not in keep:
                continue
            probs = torch.sigmoid(logits.float())[:, 0] > options.threshold
            masks = probs.cpu().numpy()
            out[frame] = {int(obj): masks[i] for i, obj in enumerate(obj_ids)}
    return out


def predict_videos(predictor: nn.Module, samples: Sequence[VideoSample],
                   options: TrackOptions = DEFAULT_TRACKING, progress: bool = True,
                   desc: str = "tracking") -> dict[str, FrameMasks]:
    """Predictions of every video, in the in-memory form ``ahcq.video.metrics.evaluate`` scores."""
    return {s.name: track_sample(predictor, s, options)
            for s in progress_bar(samples, desc=desc, unit="video", disable=not progress)}


@dataclass
class TrackedPredictions:
    """Predictions that ``ahcq.video.metrics.evaluate`` pulls video by video, tracking each on first use.

    Only the current video's annotated frames are held, so memory stays bounded on long, high-resolution
    datasets (SA-V is tracked at 24 fps but annotated at 6 fps) where ``predict_videos`` would keep all.
    """

    predictor: nn.Module
    options: TrackOptions = DEFAULT_TRACKING
    _video: str | None = field(default=None, init=False, repr=False)
    _masks: FrameMasks = field(default_factory=dict, init=False, repr=False)

    def masks(self, sample: VideoSample, frame: int, objects: Sequence[int]) -> dict[int, np.ndarray | None]:
        if sample.name != self._video:
            self._masks = {}  # free the previous video before tracking the next
            annotated = {f for obj in sample.objects for f in sample.annotated_frames(obj)}
            self._masks = track_sample(self.predictor, sample, self.options, keep=annotated)
            self._video = sample.name
        frame_masks = self._masks.get(frame, {})
        return {obj: frame_masks.get(obj) for obj in objects}
