"""tools/bench_sam2.py: arguments, config handling and the section timer (the timing run itself is manual)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tool_loader import load_tool
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
bench_sam2 = load_tool("bench_sam2")


def test_arguments_are_validated() -> None:
    args = bench_sam2.parse_args([])
    assert (args.size, args.calib_size, args.config) == (512, 128, ROOT / "exp" / "sam2" / "w4a4.yaml")
    for bad in (["--size", "100"], ["--calib-size", "32"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench_sam2.parse_args(bad)


def test_bad_config_exits_2_before_building(tmp_path, capsys) -> None:
    assert bench_sam2.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err


def test_fast_calibration_changes_only_the_searches() -> None:
    full = bench_sam2.bench_qconfig(bench_sam2.parse_args(["--full-calib"]))
    fast = bench_sam2.bench_qconfig(bench_sam2.parse_args([]))
    assert full.w_qconfig.observer == "mse" and fast.w_qconfig.observer == "minmax"
    assert fast.lnq.alphas == bench_sam2.FAST_LNQ_ALPHAS and len(full.lnq.alphas) == 9
    assert fast.w_qconfig.quantizer == full.w_qconfig.quantizer == "adaround"
    assert (fast.ahcptq, fast.ptq4sam, fast.a_qconfig) == (full.ahcptq, full.ptq4sam, full.a_qconfig)
    assert bench_sam2.bits_label(fast) == "W4A4 fq"


def test_section_timer_sums_time_per_label() -> None:
    timer = bench_sam2.SectionTimer()
    layers = [nn.Linear(4, 4), nn.Linear(4, 4)]
    for layer in layers:
        timer.attach(layer, "linear")
    x = torch.randn(2, 4)
    layers[1](layers[0](x))
    assert list(timer.totals) == ["linear"] and timer.totals["linear"] > 0
