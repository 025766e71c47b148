"""The FP32 baseline PE is area-only, but its operators must compute: check them against numpy (Icarus;
Verilator would add two more builds for a module that never reaches the golden-model flow)."""
from __future__ import annotations

import numpy as np
import pytest

from hw.tb.sim import HW_ROOT, build, run, unavailable_reason


@pytest.mark.parametrize("op", ["fp32_mul", "fp32_add"])
def test_fp32_operator_within_two_ulp(op: str, tmp_path) -> None:
    reason = unavailable_reason("icarus")
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(17)
    a = (rng.normal(size=300) * np.exp2(rng.integers(-20, 20, size=300))).astype(np.float32)
    b = (rng.normal(size=300) * np.exp2(rng.integers(-20, 20, size=300))).astype(np.float32)
    if op == "fp32_add":
        b[:100] = -a[:100] * np.float32(0.999)
    ref = a * b if op == "fp32_mul" else a + b
    vectors = tmp_path / "vectors.npz"
    np.savez(vectors, a=a.view(np.uint32), b=b.view(np.uint32), ref=ref.astype(np.float32).view(np.uint32))
    runner = build("icarus", op, [HW_ROOT / "syn" / f"{op}.v"])
    run(runner, op, "hw.tb.cocotb_fp32", tmp_path / "run", {}, {"HW_FP32_VECTORS": vectors})
