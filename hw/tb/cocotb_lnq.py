"""cocotb bench for lnq_harness: for each prepared table, pulse start, wait for done, compare the decoded
fixed-point probabilities bit-exactly with the golden table lookup."""
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


@cocotb.test()
async def lnq_tables_bit_exact(dut):
    """Every table of the manifest decodes its code stream exactly like the golden lookup."""
    cases = json.loads(Path(os.environ["HW_LNQ_MANIFEST"]).read_text())
    current = Path(os.environ["HW_LNQ_CURRENT"])
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.start.value = 0
    await ClockCycles(dut.clk, 3)
    for case in cases:
        for key, src in case["files"].items():
            shutil.copyfile(src, current / f"{key.lower()}.hex")
        ref = dict(np.load(case["expected"]))
        await FallingEdge(dut.clk)
        dut.rst.value = 0
        dut.start.value = 1
        await FallingEdge(dut.clk)
        dut.start.value = 0
        await with_timeout(RisingEdge(dut.done), 10 * (ref["codes"].size + 600), "ns")
        await ClockCycles(dut.clk, 2)
        got = read_hex(current / "ofile.hex", 16, signed=False)
        exp = ref["values"]
        if not np.array_equal(got, exp):
            i = int(np.flatnonzero(got != exp)[0])
            raise AssertionError(f"{case['label']}: {int((got != exp).sum())} of {exp.size} values differ; "
                                 f"first at {i}: code {int(ref['codes'][i])} rtl {got[i]:#06x} "
                                 f"expected {exp[i]:#06x}")
        dut._log.info("%s: %d codes bit-exact", case["label"], exp.size)
