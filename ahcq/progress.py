"""Progress bars that a log file never sees: tqdm on a terminal, nothing when stderr is redirected (the
steps that matter log one line each instead)."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when asked or when stderr is not a terminal."""
    return tqdm(iterable, disable=disable or not sys.stderr.isatty(), **kwargs)
