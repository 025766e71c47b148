"""Prompt sources: where the boxes given to SAM come from (a detector, a detection file, the ground truth)."""

from .base import Prompts, PromptSource
from .detection_file import DetectionFilePrompt
from .gt_box import GTBoxPrompt
from .mmdet_detector import MMDetPrompt

__all__ = ["DetectionFilePrompt", "GTBoxPrompt", "MMDetPrompt", "PromptSource", "Prompts"]
