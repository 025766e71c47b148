"""Video object segmentation data (SA-V and DAVIS layouts), J&F evaluation and on-disk test clips."""
from ahcq.video.datasets import Layout, VideoSample, read_dataset, read_davis, read_sav, write_masks
from ahcq.video.metrics import FolderPredictions, MemoryPredictions, Score, VOSReport, evaluate

__all__ = [
    "FolderPredictions", "Layout", "MemoryPredictions", "Score", "VOSReport", "VideoSample", "evaluate",
    "read_dataset", "read_davis", "read_sav", "write_masks",
]
