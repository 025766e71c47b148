"""mmdet plugin: importing it registers ``DetWrapperInstanceSAM``, the SAM builders and the prompt sources."""

from . import sam_builders
from .detector import DetWrapperInstanceSAM, SamSample
from .prompts import DetectionFilePrompt, GTBoxPrompt, MMDetPrompt, Prompts, PromptSource
from .registry import PROMPT_SOURCES, SAM_BUILDERS

__all__ = [
    "PROMPT_SOURCES",
    "SAM_BUILDERS",
    "DetWrapperInstanceSAM",
    "DetectionFilePrompt",
    "GTBoxPrompt",
    "MMDetPrompt",
    "PromptSource",
    "Prompts",
    "SamSample",
    "sam_builders",
]
