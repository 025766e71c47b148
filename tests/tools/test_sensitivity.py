"""tools/sensitivity.py on a small random SAM and generated demo data: MACs against torch's own layer shapes
counted on the float model, wider widths costing less, resume, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_loader import load_tool
from torch import nn

from ahcq.analysis import load_samples, sam_masks
from ahcq.models.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
             global_attn_indexes=[1], out_chans=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
             iou_head_hidden_dim=32)
tool = load_tool("sensitivity")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sensitivity")
    load_tool("make_demo_data").generate(root / "demo", seed=2, num_train=4, num_val=2, size=64)
    torch.manual_seed(0)
    torch.save(build_tiny_sam(**SIZES).state_dict(), root / "sam.pth")
    (root / "sam.json").write_text(json.dumps({"build_args": SIZES}))
    return {"root": root, "data": root / "demo", "ckpt": root / "sam.pth"}


def _run(setup: dict[str, Path], out: Path, *extra: str) -> int:
    argv = ["--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]),
            "--q_config", str(ROOT / "exp" / "minmax" / "w4a4.yaml"), "--out", str(out),
            "--calib-images", "2", "--images", "2", "--max-boxes", "3", *extra]
    return tool.run_cli(tool.main, tool.build_parser(), argv)


def test_sites_macs_widths_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "sens"
    assert _run(setup, out, "--bits", "4", "8") == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "sensitivity.png").stat().st_size > 0 and "| site |" in (out / "sensitivity.md").read_text()
    sites = {s["site"]: s for s in result["sites"]}

    float_sam = build_tiny_sam(checkpoint=setup["ckpt"], **SIZES)
    macs: dict[str, float] = {}

    def count(module: nn.Module, _args: tuple, out: torch.Tensor, name: str) -> None:
        fan_in = module.in_features if isinstance(module, nn.Linear) else (
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
        macs[name] = macs.get(name, 0) + out.numel() * fan_in

    for name, module in float_sam.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            module.register_forward_hook(lambda m, a, o, name=name: count(m, a, o, name))
    sample = tool.choose_images(setup["data"], "train", 2, 2, 0)[1][0]  # the image MACs are counted on
    with torch.no_grad():
        sam_masks(float_sam, sample, 3)
    layers = {n: s for n, s in sites.items() if s["kind"] == "layer"}
    assert layers and all(s["macs"] == pytest.approx(macs[n]) for n, s in layers.items())

    alone4 = np.array([s["by_bits"]["4"]["alone_error"] for s in sites.values()])
    alone8 = np.array([s["by_bits"]["8"]["alone_error"] for s in sites.values()])
    assert (alone4 >= 0).all() and np.mean(alone8 <= alone4) >= 0.9
    assert result["quantized"]["8"]["error"] < result["quantized"]["4"]["error"]

    capsys.readouterr()
    assert _run(setup, out, "--bits", "4", "8") == 0
    assert "reusing" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["sites"] == result["sites"]


def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")]
    assert tool.run_cli(tool.main, tool.build_parser(), argv) == 2
    assert "none.pth" in capsys.readouterr().err
    assert _run(setup, tmp_path / "o", "--bits", "9") == 2
    assert "--bits" in capsys.readouterr().err


def test_measured_images_are_never_calibrated_on(setup):
    calib, measured = tool.choose_images(setup["data"], "train", 2, 2, 0)
    assert len(calib) == len(measured) == 2
    assert not {s.image_id for s in calib} & {s.image_id for s in measured}
    val_ids = {s.image_id for s in load_samples(setup["data"], "val", 2, 0)}
    assert {s.image_id for s in tool.choose_images(setup["data"], "val", 2, 2, 0)[1]} == val_ids
