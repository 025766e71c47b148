"""Clip generators: seeded, objects visible and moving; labelme polygons rasterised as labelme does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ahcq.video import read_davis, read_sav
from ahcq.video.fixtures import labelme_clip_to_layout, make_moving_shapes_clip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_clip(tmp_path: Path) -> None:
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        make_moving_shapes_clip(tmp_path / name, "sav", n_frames=3, size=(32, 40), seed=seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


@pytest.mark.parametrize("n_objects", [1, 4, 7])
def test_objects_start_visible_and_move(n_objects: int, tmp_path: Path) -> None:
    make_moving_shapes_clip(tmp_path, "davis", n_frames=6, size=(48, 64), n_objects=n_objects, seed=n_objects)
    sample = read_davis(tmp_path)[0]
    assert sample.objects == tuple(range(1, n_objects + 1))
    assert all(frame == 0 for frame in sample.prompt_frames.values())
    first, last = sample.gt_masks(0), sample.gt_masks(5)
    for obj in sample.objects:
        assert first[obj].sum() > 10
        assert not np.array_equal(first[obj], last[obj])


def test_bad_generator_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        make_moving_shapes_clip(tmp_path, "sav", n_frames=0)
    with pytest.raises(ValueError, match="254"):
        make_moving_shapes_clip(tmp_path, "davis", n_objects=300)
    with pytest.raises(ValueError, match="'mpeg'"):
        make_moving_shapes_clip(tmp_path, "mpeg")


def _labelme_class_map(labelme_dir: Path, frame_number: int) -> np.ndarray | None:
    """labelme's own export of the clip (class ids, shapes painted in file order), when installed."""
    path = labelme_dir.parent / "data_dataset_voc" / "SegmentationClass" / f"{frame_number:08d}.npy"
    return np.load(path) if path.is_file() else None


@pytest.mark.parametrize("layout", ["sav", "davis"])
def test_labelme_clip_matches_labelme_export(layout: str, labelme_dir: Path, tmp_path: Path) -> None:
    """Instances: the two "track" polygons, then the "car" one; painted in that order with labelme's class
    ids (car 1, track 2) they reproduce labelme's own class masks pixel for pixel."""
    labelme_clip_to_layout(labelme_dir, tmp_path, layout)
    sample = (read_sav if layout == "sav" else read_davis)(tmp_path, split="val")[0]
    offset = 0 if layout == "sav" else 1
    assert sample.name == "labelme_street" and sample.size == (563, 1000)
    assert sample.frame_names == tuple(f"{n:05d}" for n in range(100, 105))
    assert sample.objects == tuple(k + offset for k in range(3))
    for index, number in enumerate(range(100, 105)):
        assert sample.frame_paths[index].read_bytes() == (labelme_dir / f"{number:08d}.jpg").read_bytes()
        masks = sample.gt_masks(index)
        classes = np.zeros(sample.size, np.uint8)
        for obj, class_id in zip(sample.objects, (2, 2, 1)):
            assert masks[obj].sum() > 1000
            classes[masks[obj]] = class_id
        expected = _labelme_class_map(labelme_dir, number)
        if expected is not None:
            np.testing.assert_array_equal(classes, expected)


def _copy_clip(labelme_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in labelme_dir.glob("0000010[01].*"):
        shutil.copy(p, dst / p.name)
    return dst


def test_labelme_bad_input_is_named(labelme_dir: Path, tmp_path: Path) -> None:
    src = _copy_clip(labelme_dir, tmp_path / "src")
    data = json.loads((src / "00000101.json").read_text())
    data["shapes"][2]["shape_type"] = "rectangle"
    (src / "00000101.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="00000101.json: shape 2 .*'rectangle'"):
        labelme_clip_to_layout(src, tmp_path / "out1", "sav")
    data["shapes"][2]["shape_type"], data["imageHeight"] = "polygon", 500
    (src / "00000101.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="00000101.json: annotated size"):
        labelme_clip_to_layout(src, tmp_path / "out2", "davis")
    (src / "00000101.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="00000101.jpg"):
        labelme_clip_to_layout(src, tmp_path / "out3", "davis")
    assert not (tmp_path / "out3").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no labelme json"):
        labelme_clip_to_layout(tmp_path / "empty", tmp_path / "out4", "davis")
