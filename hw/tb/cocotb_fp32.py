"""cocotb bench for the area-only FP32 operators (fp32_mul / fp32_add): drive random normal operands and
check the result against numpy float32 within the truncation error (2 ulp)."""
from __future__ import annotations

import os

import cocotb
import numpy as np
from cocotb.triggers import Timer


@cocotb.test()
async def fp32_within_two_ulp(dut):
    """Every operand pair: |rtl − float32 reference| ≤ 2 ulp of the reference."""
    data = np.load(os.environ["HW_FP32_VECTORS"])
    a, b, ref = data["a"], data["b"], data["ref"]
    got = np.zeros(a.size, dtype=np.uint32)
    for i in range(a.size):
        dut.a.value = int(a[i])
        dut.b.value = int(b[i])
        await Timer(1, unit="ns")
        got[i] = int(dut.y.value)
    got_f, ref_f = got.view(np.float32).astype(np.float64), ref.view(np.float32).astype(np.float64)
    ulp = np.spacing(np.abs(ref.view(np.float32))).astype(np.float64)
    bad = np.flatnonzero(np.abs(got_f - ref_f) > 2 * ulp)
    if bad.size:
        i = int(bad[0])
        raise AssertionError(f"{bad.size} of {a.size} results off; first at {i}: a={a[i]:#010x} "
                             f"b={b[i]:#010x} rtl={got[i]:#010x} ({got_f[i]!r}) ref={ref_f[i]!r}")
