"""Offline transforms applied before or between calibration steps: BIG sign folding, ACNR, PCC clipping."""
from ahcq.quantization.transforms.acnr import (
    ACNRResult,
    acnr,
    apply_acnr_,
    error_energy,
    proximal_singular_values,
)
from ahcq.quantization.transforms.big import fold_sign, is_bimodal, kde_peaks
from ahcq.quantization.transforms.pcc import (
    ClipResult,
    attention_mask,
    clip_range,
    iou_distance,
    search_clip,
    search_clip_sequential,
)

__all__ = [
    "ACNRResult",
    "ClipResult",
    "acnr",
    "apply_acnr_",
    "attention_mask",
    "clip_range",
    "error_energy",
    "fold_sign",
    "iou_distance",
    "is_bimodal",
    "kde_peaks",
    "proximal_singular_values",
    "search_clip",
    "search_clip_sequential",
]
