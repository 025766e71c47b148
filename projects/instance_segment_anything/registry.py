"""Registries of the plugin's pluggable parts, chosen by ``type`` in configs: SAM builders, prompt sources."""

from mmcv.utils import Registry

SAM_BUILDERS = Registry("sam builder")
PROMPT_SOURCES = Registry("prompt source")
