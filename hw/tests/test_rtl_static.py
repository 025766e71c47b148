"""Static RTL checks: verilator -Wall lint, Icarus parsing, parameter checks that stop simulation,
and the cycle model's closed form."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from hw.model.cycles import PIPELINE_CYCLES, beats_per_product, tile_cycles
from hw.tb.sim import HW_ROOT, RTL_SOURCES, lint, unavailable_reason

SYN_SOURCES = sorted((HW_ROOT / "syn").glob("*.v"))
TOPS = {
    "ahcq_tile": RTL_SOURCES,
    "tile_harness": [*RTL_SOURCES, HW_ROOT / "tb" / "tile_harness.v"],
    "lnq_harness": [HW_ROOT / "rtl" / "lnq_lut.v", HW_ROOT / "tb" / "lnq_harness.v"],
    "pe8_hybrid4": [*SYN_SOURCES, *RTL_SOURCES],
    "pe8_int8": [*SYN_SOURCES, *RTL_SOURCES],
    "pe8_fp32": [*SYN_SOURCES, *RTL_SOURCES],
}


@pytest.mark.parametrize("top", list(TOPS))
def test_verilator_lint_wall_clean(top: str) -> None:
    reason = unavailable_reason("verilator")
    if reason:
        pytest.skip(reason)
    result = lint(top, TOPS[top])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_has_timescale() -> None:
    for path in [*RTL_SOURCES, *SYN_SOURCES, *(HW_ROOT / "tb").glob("*.v")]:
        assert path.read_text().startswith("`timescale 1ns/1ps"), path.name


@pytest.mark.parametrize("param,value", [("LANES", 0), ("NS", 9)])
def test_bad_parameter_stops_simulation(param: str, value: int, tmp_path) -> None:
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not on PATH")
    out = tmp_path / "sim.vvp"
    subprocess.run(["iverilog", "-g2012", "-s", "ahcq_tile", f"-Pahcq_tile.{param}={value}", "-o", str(out),
                    *map(str, RTL_SOURCES)], check=True, capture_output=True)
    run = subprocess.run(["vvp", "-n", str(out)], capture_output=True, text=True, timeout=60)
    assert "ahcq_tile:" in run.stdout + run.stderr and "FATAL" in (run.stdout + run.stderr).upper()


def test_cycle_model_closed_form() -> None:
    no_stall = tile_cycles(4, 5, 6, 4)
    assert (no_stall.cycles, no_stall.stalls) == (4 * 5 * 6 + 4 + PIPELINE_CYCLES, 0)
    stall = tile_cycles(2, 3, 1, 2)
    assert stall.stalls == 5 and stall.cycles == 6 + 5 + 2 + PIPELINE_CYCLES
    assert beats_per_product(100, 8) == 13
    assert beats_per_product(100, 8, [1, 1, 98]) == 1 + 1 + 13
