"""cocotb bench for tile_harness: for each prepared tile, load its files, pulse start, wait for done and
compare the dumped outputs and the cycle/stall counters bit-exactly with the golden model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, with_timeout

from hw.model.memfiles import read_hex


def _first_mismatch(label: str, got: np.ndarray, exp: np.ndarray, ref: dict) -> str:
    n, o = (int(i) for i in np.argwhere(got != exp)[0])
    with np.printoptions(threshold=64, edgeitems=16):
        return (f"{label}: {int((got != exp).sum())} of {exp.size} outputs differ; first at token {n}, "
                f"output {o}: rtl {got[n, o]} expected {exp[n, o]}\n"
                f"  accumulator slots {ref['acc'][n, o].tolist()}\n"
                f"  activation codes (stream order) {ref['x'][n]}\n  weights (stream order) {ref['w'][o]}")


@cocotb.test()
async def tiles_bit_exact(dut):
    """Every tile of the manifest: outputs equal, cycles and stalls equal the cycle model."""
    tiles = json.loads(Path(os.environ["HW_TILE_MANIFEST"]).read_text())
    current = Path(os.environ["HW_TILE_CURRENT"])
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.load.value = 0
    dut.start.value = 0
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    for tile in tiles:
        for key, src in tile["files"].items():
            shutil.copyfile(src, current / f"{key.lower()}.hex")
        ref = dict(np.load(Path(tile["dir"]) / "expected.npz"))
        await FallingEdge(dut.clk)
        dut.load.value = 1
        await FallingEdge(dut.clk)
        dut.load.value = 0
        while not int(dut.ready.value):
            await FallingEdge(dut.clk)
        dut.start.value = 1
        await FallingEdge(dut.clk)
        dut.start.value = 0
        await with_timeout(RisingEdge(dut.done), 10 * (int(ref["cycles"]) + 64), "ns")
        await ClockCycles(dut.clk, 3)
        exp = ref["out"]
        got = read_hex(current / "ofile.hex", 32).reshape(exp.shape)
        assert np.array_equal(got, exp), _first_mismatch(tile["label"], got, exp, ref)
        cycles, stalls = int(dut.cycles.value), int(dut.stalls.value)
        model = (int(ref["cycles"]), int(ref["stalls"]))
        label = tile["label"]
        assert (cycles, stalls) == model, f"{label}: rtl cycles/stalls {cycles}/{stalls}, model {model}"
        dut._log.info("%s: %d outputs bit-exact, %d cycles, %d stalls", tile["label"], exp.size, cycles,
                      stalls)
