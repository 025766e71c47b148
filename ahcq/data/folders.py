"""Swapping a finished folder into place, so a generated split is never left half-written."""
from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing what ``final`` held only once ``tmp`` is complete."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
