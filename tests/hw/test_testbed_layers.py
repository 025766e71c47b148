"""Layers of the quantized trained testbed SAM on real demo activations (HLUQ encoder MLP lin2; CAG decoder
q_proj requantized to its attention's query codes): golden model within the stated tolerances, tiles
bit-exact on both simulators. Nothing depends on the exact checkpoint weights."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from ahcq.hardware import testbed_layers
from hw.model.golden import MAX_SLOTS, compile_layer, dequantized, load_layer, run_layer
from hw.model.tiles import slice_tile
from hw.tb.sim import HARNESS_LANES, REPO_ROOT, SIMULATORS, run_tiles, unavailable_reason

if not testbed_layers.CHECKPOINT.is_file():
    pytest.skip("ckpt/tiny_sam.pth is not committed (tools/train_tiny_sam.py)", allow_module_level=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """The two layers as read back from the .npz files written by ahcq's export (calibrated once)."""
    paths = testbed_layers.export_testbed_layers(tmp_path_factory.mktemp("testbed"))
    return {name: load_layer(path) for name, path in paths.items()}


def test_testbed_layers_within_tolerance(exported: dict[str, dict]) -> None:
    lin2, q_proj = exported["lin2"], exported["q_proj"]
    assert str(lin2["x_kind"]) == "hluq" and "o_codes" not in lin2
    assert str(q_proj["x_kind"]) == "cag" and "o_codes" in q_proj
    assert q_proj["x_scale"].size <= MAX_SLOTS  # regrouped: the per-channel calibration would not fit
    for name, layer in exported.items():
        prog, out = run_layer(layer, HARNESS_LANES)
        y = layer["y_ref"].astype(np.float64)
        if "o_codes" in layer:
            assert np.abs(out - layer["o_codes"]).max() <= 1, name
            expect = np.clip(np.floor(y / prog.out_scale + 0.5) + prog.out_zero, prog.qmin, prog.qmax)
            assert np.abs(out - expect).max() <= 1, name
        else:
            assert np.abs(dequantized(prog, out) - y).max() <= 2.0**-12 * np.abs(y).max(), name


def test_demo_scenes_are_the_demo_val_split(tmp_path) -> None:
    """The in-memory images and boxes are those tools/make_demo_data.py writes for its val split."""
    path = REPO_ROOT / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("hw_make_demo_data", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    coco = tool.generate_split(tmp_path, "val", 3, 0, tool.SceneSpec(size=testbed_layers.DEMO_SIZE))
    for entry in coco["images"]:
        image, boxes = testbed_layers.demo_scene(entry["id"] - 1)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "val" / entry["file_name"])), image)
        expected = [a["bbox"] for a in coco["annotations"] if a["image_id"] == entry["id"]]
        assert np.array_equal(boxes, np.asarray(expected, dtype=np.float32))


@pytest.mark.parametrize("sim", SIMULATORS)
def test_testbed_tiles_bit_exact(sim: str, exported: dict[str, dict], tmp_path) -> None:
    reason = unavailable_reason(sim)
    if reason:
        pytest.skip(reason)
    programs = []
    for name, layer in exported.items():
        cin = layer["x_codes"].shape[1]
        for where, tokens, outputs in (("first", slice(0, 4), slice(0, 8)), ("last", slice(-4, None),
                                                                               slice(-8, None))):
            tile = slice_tile(layer, tokens, outputs)
            programs.append((f"testbed {name} {where} tile 4x{cin}x8", compile_layer(tile, HARNESS_LANES)))
    run_tiles(sim, programs, tmp_path)
