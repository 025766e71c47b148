"""yosys area estimates for 8-input PEs of the same structure: INT4 HLUQ/CAG hybrid, INT8 MAC, FP32 MAC.

Two metrics per design: generic CMOS transistor estimate (`synth -flatten; stat -tech cmos`, ~1-40 s) and,
with --xilinx, 7-series LUTs without DSPs (`synth_xilinx -nodsp`, ~13 s for the integer PEs, ~90 s for
FP32). Results go to area.json next to this file, which hw/report.py reads.

    python -m hw.syn.synth [--xilinx] [--only pe8_hybrid4 ...]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SYN_DIR = Path(__file__).resolve().parent
RTL_DIR = SYN_DIR.parent / "rtl"
AREA_JSON = SYN_DIR / "area.json"
DESIGNS = {
    "pe8_hybrid4": ["lane_dispatch.v", "pe_lane.v", "pe_array.v"],
    "pe8_int8": [],
    "pe8_fp32": [],
}
PE_INPUTS = 8
LUT_CELLS = ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6")


def _sources(top: str) -> list[Path]:
    return sorted(SYN_DIR.glob("*.v")) + [RTL_DIR / name for name in DESIGNS[top]]


def _yosys(script: str) -> str:
    """Run yosys on a script and return the text written by `tee -o`."""
    exe = shutil.which("yosys")
    if exe is None:
        raise RuntimeError("yosys is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stat.txt"
        subprocess.run([exe, "-q", "-p", script.format(out=out)], check=True, capture_output=True, text=True)
        return out.read_text()


def cmos_transistors(top: str) -> int:
    """Estimated transistor count of a flattened generic netlist."""
    files = " ".join(str(p) for p in _sources(top))
    text = _yosys(f"read_verilog -sv {files}; synth -flatten -top {top}; tee -o {{out}} stat -tech cmos")
    return int(re.search(r"Estimated number of transistors:\s+(\d+)", text).group(1))


def xilinx_luts(top: str) -> dict[str, int]:
    """7-series cell counts without DSPs: LUTs (all sizes), CARRY4, flip-flops."""
    files = " ".join(str(p) for p in _sources(top))
    text = _yosys(f"read_verilog -sv {files}; synth_xilinx -nodsp -flatten -top {top}; tee -o {{out}} stat")
    cells = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s*$", text, re.M)}
    return {"LUT": sum(cells.get(c, 0) for c in LUT_CELLS), "CARRY4": cells.get("CARRY4", 0),
            "FF": sum(v for k, v in cells.items() if k.startswith("FD"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xilinx", action="store_true", help="also run synth_xilinx -nodsp (slow for FP32)")
    parser.add_argument("--only", nargs="*", default=list(DESIGNS), choices=list(DESIGNS))
    args = parser.parse_args(argv)
    area = json.loads(AREA_JSON.read_text()) if AREA_JSON.exists() else {}
    for top in args.only:
        entry = area.setdefault(top, {"inputs": PE_INPUTS})
        entry["cmos_transistors"] = cmos_transistors(top)
        if args.xilinx:
            entry.update({f"xilinx_{k}": v for k, v in xilinx_luts(top).items()})
        print(f"{top:12s} " + "  ".join(f"{k}={v}" for k, v in entry.items()))
    tmp = AREA_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(area, indent=1, sort_keys=True) + "\n")
    tmp.replace(AREA_JSON)
    return area


if __name__ == "__main__":
    main()
