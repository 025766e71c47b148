"""Per-image SAM output -> mmdet 2.x instance results, the format ``CocoDataset.evaluate`` consumes."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_mmdet_results"]


def to_mmdet_results(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, num_classes: int
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """``(bbox_results, segm_results)``: per class (n, 5) float32 [x1, y1, x2, y2, score] and n HxW masks."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"prompt labels span [{int(labels.min())}, {int(labels.max())}], beyond num_classes={num_classes}"
        )
    dets = torch.cat([boxes.float().cpu(), scores.float().cpu()[:, None]], dim=1).numpy()
    masks_np = masks.cpu().numpy()
    labels_np = labels.cpu().numpy()
    bbox_results = [dets[labels_np == c] for c in range(num_classes)]
    segm_results = [list(masks_np[labels_np == c]) for c in range(num_classes)]
    return bbox_results, segm_results
