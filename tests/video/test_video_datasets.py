"""SA-V and DAVIS readers: both layouts give the same VideoSample, and malformed folders fail by name."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ahcq.video import Layout, read_dataset, read_davis, read_sav, write_masks
from ahcq.video.fixtures import make_moving_shapes_clip


def _clip(root: Path, layout: str, video: str = "clip") -> Path:
    make_moving_shapes_clip(root, layout, n_frames=4, size=(24, 32), n_objects=2, seed=1, video=video)
    return root


def test_both_layouts_read_back_the_same_clip(shapes_roots: dict[str, Path]) -> None:
    sav, davis = read_sav(shapes_roots["sav"]), read_davis(shapes_roots["davis"])
    assert [s.name for s in sav] == [s.name for s in davis] == ["shapes"]
    s, d = sav[0], davis[0]
    assert (s.layout, d.layout) == (Layout.SAV, Layout.DAVIS)
    assert s.objects == (0, 1, 2) and d.objects == (1, 2, 3)
    assert s.frame_names == d.frame_names == tuple(f"{t:05d}" for t in range(10))
    assert s.size == d.size == (72, 96)
    assert s.prompt_frames == {0: 0, 1: 0, 2: 0} and d.prompt_frames == {1: 0, 2: 0, 3: 0}
    assert s.frames_dir == shapes_roots["sav"] / "JPEGImages_24fps" / "shapes"
    frame, mask = d.prompt(2)
    assert frame == 0 and mask.any() and np.array_equal(mask, s.gt_mask(1, 0))
    for frame in range(10):
        sm, dm = s.gt_masks(frame), d.gt_masks(frame)
        for obj in s.objects:
            np.testing.assert_array_equal(sm[obj], dm[obj + 1])
            np.testing.assert_array_equal(sm[obj], s.gt_mask(obj, frame))
        assert d.void_mask(frame) is None and s.void_mask(frame) is None
        labels = np.array(Image.open(d.annotations[1][frame]))
        assert set(np.unique(labels)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("layout", ["sav", "davis"])
def test_written_masks_read_back_in_integer_frame_order(layout: str, tmp_path: Path) -> None:
    """Frames 0, 2, 10 (lexical order would put 10 before 2); annotation 10.png is frame index 2."""
    frames_dir = tmp_path / ("JPEGImages_24fps/v" if layout == "sav" else "JPEGImages/480p/v")
    ann_dir = tmp_path / ("Annotations_6fps/v" if layout == "sav" else "Annotations/480p/v")
    frames_dir.mkdir(parents=True)
    rng = np.random.default_rng(5)
    written = {}
    for number in (10, 0, 2):
        Image.new("RGB", (16, 12)).save(frames_dir / f"{number}.jpg")
        a, b = rng.random((12, 16)) < 0.3, rng.random((12, 16)) < 0.3
        written[number] = {1: a & ~b, 2: b}
        write_masks(ann_dir, layout, str(number), written[number])
    sample = read_dataset(tmp_path, layout)[0]
    assert sample.frame_names == ("0", "2", "10")
    assert sample.annotated_frames(1) == (0, 1, 2)
    for index, number in enumerate((0, 2, 10)):
        for obj, mask in written[number].items():
            np.testing.assert_array_equal(sample.gt_mask(obj, index), mask)


def test_sav_sparse_annotations_map_to_frame_indices(tmp_path: Path) -> None:
    make_moving_shapes_clip(tmp_path, "sav", n_frames=13, size=(24, 32), n_objects=2, annotate_every=4)
    sample = read_sav(tmp_path, split="val")[0]
    assert len(sample.frame_paths) == 13
    assert all(sample.annotated_frames(o) == (0, 4, 8, 12) for o in sample.objects)
    assert sample.gt_masks(5) == {}
    with pytest.raises(KeyError, match="frame 5"):
        sample.gt_mask(0, 5)


def test_sav_prompt_frame_is_first_non_empty_annotation(tmp_path: Path) -> None:
    _clip(tmp_path, "sav")
    obj_dir = tmp_path / "Annotations_6fps" / "clip" / "000"
    Image.new("L", (32, 24)).save(obj_dir / "00000.png")
    frame, mask = read_sav(tmp_path)[0].prompt(0)
    assert frame == 1 and mask.any()
    for t in range(4):
        Image.new("L", (32, 24)).save(obj_dir / f"{t:05d}.png")
    with pytest.raises(ValueError, match="every annotation of this object is empty"):
        read_sav(tmp_path)


@pytest.mark.parametrize("layout", ["sav", "davis"])
def test_split_file_selects_and_orders_videos(layout: str, tmp_path: Path) -> None:
    _clip(tmp_path, layout, "b")
    _clip(tmp_path, layout, "a")
    assert [s.name for s in read_dataset(tmp_path, layout, "val")] == ["b", "a"]
    assert [s.name for s in read_dataset(tmp_path, layout)] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="train.txt"):
        read_dataset(tmp_path, layout, "train")
    split = tmp_path / ("val.txt" if layout == "sav" else "ImageSets/2017/val.txt")
    split.write_text("\n")
    with pytest.raises(ValueError, match="no videos"):
        read_dataset(tmp_path, layout, "val")


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing dataset folder"):
        read_sav(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Annotations_6fps"):
        read_sav(tmp_path)
    _clip(tmp_path, "sav")
    shutil.rmtree(tmp_path / "JPEGImages_24fps" / "clip")
    with pytest.raises(FileNotFoundError, match="JPEGImages_24fps/clip"):
        read_sav(tmp_path)


def _sav_case(tmp_path: Path, case: str) -> None:
    frames, ann = tmp_path / "JPEGImages_24fps" / "clip", tmp_path / "Annotations_6fps" / "clip"
    if case == "no objects":
        shutil.rmtree(ann)
        ann.mkdir()
    elif case == "empty object":
        (ann / "007").mkdir()
    elif case == "frame name":
        Image.new("RGB", (32, 24)).save(frames / "cover.jpg")
    elif case == "object name":
        (ann / "abc").mkdir()
    elif case == "orphan annotation":
        shutil.copy(ann / "000" / "00001.png", ann / "000" / "00099.png")
    elif case == "size":
        Image.new("L", (31, 24), 255).save(ann / "001" / "00000.png")
    elif case == "duplicate":
        shutil.copy(frames / "00001.jpg", frames / "1.jpg")
    elif case == "rgb":
        Image.new("RGB", (32, 24)).save(ann / "001" / "00000.png")
    elif case == "no frames":
        for p in frames.iterdir():
            p.unlink()


@pytest.mark.parametrize("case, message", [
    ("no objects", "no object folders"),
    ("empty object", "007: object folder holds no annotation PNGs"),
    ("frame name", "cover.jpg: frame name is not an integer"),
    ("object name", "abc: object folder name is not an integer"),
    ("orphan annotation", "00099.png: annotation has no matching frame"),
    ("size", "00000.png: mask size"),
    ("duplicate", "same number 1"),
    ("rgb", "single-channel"),
    ("no frames", "no JPEG frames"),
])
def test_malformed_sav_layout_is_named(case: str, message: str, tmp_path: Path) -> None:
    _clip(tmp_path, "sav")
    _sav_case(tmp_path, case)
    with pytest.raises(ValueError, match=message):
        read_sav(tmp_path)


def test_malformed_davis_layout_is_named(tmp_path: Path) -> None:
    _clip(tmp_path, "davis")
    ann = tmp_path / "Annotations" / "480p" / "clip"
    Image.new("P", (32, 23)).save(ann / "00002.png")
    with pytest.raises(ValueError, match="00002.png: mask size"):
        read_davis(tmp_path)
    for t in range(4):
        Image.new("P", (32, 24)).save(ann / f"{t:05d}.png")
    with pytest.raises(ValueError, match="no annotated objects"):
        read_davis(tmp_path)
    shutil.rmtree(ann)
    with pytest.raises(FileNotFoundError, match="Annotations/480p/clip"):
        read_davis(tmp_path, split="val")


def test_davis_void_label_is_read_as_void(tmp_path: Path) -> None:
    _clip(tmp_path, "davis")
    png = tmp_path / "Annotations" / "480p" / "clip" / "00001.png"
    labels = np.array(Image.open(png))
    labels[:3, :3] = 255
    img = Image.fromarray(labels, "P")
    img.putpalette(Image.open(png).getpalette())
    img.save(png)
    sample = read_davis(tmp_path)[0]
    assert sample.objects == (1, 2)
    void = sample.void_mask(1)
    assert void is not None and void.sum() == 9 and void[:3, :3].all()
    assert sample.void_mask(0) is None


def test_write_masks_rejects_what_a_palette_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object id 255"):
        write_masks(tmp_path, "davis", "00000", {255: np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="no masks and no size"):
        write_masks(tmp_path, "davis", "00000", {})
    write_masks(tmp_path, "davis", "00000", {}, size=(3, 4))
    assert np.array(Image.open(tmp_path / "00000.png")).shape == (3, 4)
