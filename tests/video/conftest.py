"""Clips on disk shared by the video tests: one generated clip in both layouts, the labelme street clip."""
from __future__ import annotations

from pathlib import Path

import pytest

from ahcq.video.fixtures import LABELME_CLIP_DIR, make_moving_shapes_clip

SHAPES = dict(n_frames=10, size=(72, 96), n_objects=3, seed=3)


@pytest.fixture(scope="session")
def shapes_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same generated clip written as an SA-V root and as a DAVIS root."""
    roots = {}
    for layout in ("sav", "davis"):
        roots[layout] = tmp_path_factory.mktemp(f"shapes_{layout}")
        make_moving_shapes_clip(roots[layout], layout, **SHAPES)
    return roots


@pytest.fixture(scope="session")
def labelme_dir() -> Path:
    if not (LABELME_CLIP_DIR / "00000100.json").is_file():
        pytest.skip("labelme-examples video clip not installed")
    return LABELME_CLIP_DIR
