"""Area estimates (yosys) and the equal-area throughput report."""
from __future__ import annotations

import shutil

import pytest

from hw.model.workload import ENC_BLOCKS, IMAGE_TOKENS, sam_b_linears
from hw.report import estimate
from hw.syn.synth import cmos_transistors


def test_sam_b_encoder_macs() -> None:
    encoder = sum(layer.macs for layer in sam_b_linears() if layer.name.startswith("encoder"))
    assert encoder == ENC_BLOCKS * IMAGE_TOKENS * 768 * (3 * 768 + 768 + 2 * 4 * 768)


def test_equal_area_estimate_scales_with_lanes() -> None:
    area = {"pe8_fp32": {"lut": 1000}, "pe8_int8": {"lut": 250}, "pe8_hybrid4": {"lut": 125}}
    res = estimate(area, "lut", 300.0)
    assert [res[k]["lanes"] for k in ("fp32", "int8", "int4")] == [16, 64, 128]
    assert res["int4"]["cycles"] < res["int8"]["cycles"] < res["fp32"]["cycles"]
    assert all(0.0 < r["utilisation"] <= 1.0 for r in res.values())
    assert 6.0 < res["fp32"]["cycles"] / res["int4"]["cycles"] <= 8.0


def test_hybrid_int4_pe_smaller_than_int8_pe() -> None:
    if shutil.which("yosys") is None:
        pytest.skip("yosys is not on PATH")
    assert cmos_transistors("pe8_hybrid4") < cmos_transistors("pe8_int8")
