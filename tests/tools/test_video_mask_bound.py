"""video_mask_bound.py: the ground truth through SAM2's quarter-size mask grid, checked on hand cases."""
import numpy as np
from tool_loader import load_tool

tool = load_tool("video_mask_bound")


def test_large_shapes_survive_and_specks_vanish_on_a_coarse_grid():
    frame = np.zeros((96, 128), bool)
    frame[20:70, 30:90] = True  # 50 x 60 pixels: about 13 x 15 cells of a 32 x 32 grid
    big = tool.through_low_res(frame, 128)
    assert big.shape == frame.shape and (big & frame).sum() / (big | frame).sum() > 0.9
    speck = np.zeros((96, 128), bool)
    speck[40:42, 50:52] = True  # 2 x 2 pixels: well under one cell of the 32 x 32 grid
    assert not tool.through_low_res(speck, 128).any()
    assert tool.through_low_res(speck, 1024).sum() >= 2  # a 256 x 256 grid keeps it


def test_the_bound_rises_with_the_input_size(tmp_path, capsys):
    make = load_tool("make_demo_videos")
    make.generate_split(tmp_path, "val", 2, 0, make.ClipSpec(frames=6))
    assert tool.main(["--root", str(tmp_path / "val"), "--image-size", "64", "512"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 ")
            or line.startswith("| 512 ")]
    small, large = (float(r[3]) for r in rows)
    assert small < large and large > 90.0
