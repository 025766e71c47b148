"""Third-party notices that say nothing to the user, filtered in one place.

``quiet_third_party`` installs the filters once (the CLIs call it before importing the libraries that
emit them); ``without_noise`` also catches the notices of code that resets the filters itself (mmdet's COCO
evaluation calls ``warnings.simplefilter('once')`` before its notice) and re-emits every other warning.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

__all__ = ["quiet_third_party", "without_noise"]

# (category, message regex) of third-party warnings that are noise on every run
_NOISE = (
    (UserWarning, r"On January 1, 2023, MMCV will release v2\.0\.0"),
    (UserWarning, r'The key "bbox" is deleted for more accurate mask AP'),
    (UserWarning, r".*cannot import name '_C'"),
)
_NOISY_LOGGERS = ("torch.utils.cpp_extension",)  # "No CUDA runtime is found" on every CPU-only import


def quiet_third_party() -> None:
    """Filter the known third-party notices, before the libraries that emit them are imported."""
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _is_noise(w: warnings.WarningMessage) -> bool:
    return any(issubclass(w.category, c) and re.match(m, str(w.message)) for c, m in _NOISE)


@contextlib.contextmanager
def without_noise() -> Iterator[None]:
    """Run the block with its warnings recorded, then re-emit all but the known notices (and restore the
    warning filters the block may have changed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not _is_noise(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
