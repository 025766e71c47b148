"""The demo set is valid COCO (checked by pycocotools and by re-measuring decoded masks) and seeded."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from tool_loader import load_tool

from ahcq.data.shapes import CATEGORIES, SceneSpec, draw_scene

ROOT = Path(__file__).resolve().parents[2]
make_demo_data = load_tool("make_demo_data")


def _generate(out: Path, seed: int, num_train: int = 6, num_val: int = 3, size: int = 96) -> Path:
    assert make_demo_data.main(["--out", str(out), "--seed", str(seed), "--num-train", str(num_train),
                                "--num-val", str(num_val), "--size", str(size)]) == 0
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("demo"), seed=3, num_train=80, num_val=12, size=128)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_agree_with_decoded_masks(demo: Path, split: str) -> None:
    coco = COCO(str(demo / "annotations" / f"instances_{split}.json"))
    cat_ids = set(coco.getCatIds())
    assert [c["name"] for c in coco.loadCats(sorted(cat_ids))] == list(CATEGORIES)
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        with Image.open(demo / split / info["file_name"]) as im:
            assert im.size == (info["width"], info["height"]) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 8
        union = np.zeros((info["height"], info["width"]), dtype=int)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            assert xs.size > 0 and ann["iscrowd"] == 0 and ann["category_id"] in cat_ids
            assert ann["area"] == xs.size
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            union += mask
        assert union.max() == 1, "visible masks of occluding objects must not overlap"


def test_scales_and_categories_vary(demo: Path) -> None:
    anns = json.loads((demo / "annotations" / "instances_train.json").read_text())["annotations"]
    areas = np.array([a["area"] for a in anns])
    assert areas.min() < 40 and areas.max() > 3000
    assert {a["category_id"] for a in anns} == set(range(1, len(CATEGORIES) + 1))


def test_occlusion_keeps_only_visible_parts() -> None:
    spec = SceneSpec(size=96)
    occluded = 0
    for i in range(30):
        img, objects = draw_scene(spec, np.random.default_rng([7, i]))
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        stacked = np.stack([o.mask for o in objects])
        assert stacked.sum(0).max() <= 1
        assert all(o.mask.sum() >= spec.min_area for o in objects)
        strict = draw_scene(SceneSpec(size=96, min_visible_frac=1.0), np.random.default_rng([7, i]))
        assert len(strict[1]) <= len(objects)
        occluded += len(strict[1]) < len(objects)
    assert occluded > 0, "some scenes should contain partly hidden objects"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = _tree(_generate(tmp_path / "a", seed=11))
    b = _tree(_generate(tmp_path / "b", seed=11))
    c = _tree(_generate(tmp_path / "c", seed=12))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert len(images) == 9 and all(a[k] != c[k] for k in images)
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_regeneration_replaces_stale_files(tmp_path: Path) -> None:
    _generate(tmp_path, seed=0, num_train=5)
    _generate(tmp_path, seed=0, num_train=2)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png", "000001.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad", [["--size", "8"], ["--num-train", "0"], ["--seed", "-1"]])
def test_bad_arguments_exit_with_error(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as err:
        make_demo_data.main(["--out", str(tmp_path), *bad])
    assert err.value.code == 2
    assert not list(tmp_path.iterdir())
