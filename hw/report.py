"""Throughput at equal area for SAM-B's Linear layers: INT4 HLUQ/CAG PEs vs INT8 and FP32 baselines.

Method (a simulated estimate, not a measurement): per-PE area from yosys (hw/syn/area.json, produced by
`python -m hw.syn.synth --xilinx`); the area budget is the FP32 design with 16 lanes (2 PEs of 8 inputs),
as in AHCQ-SAM's FPGA table; each kind gets as many whole 8-input PEs as fit. Every PE is one instance of
the simulated tile engine working on its share of the output channels; its cycles come from the cycle model
that equals the RTL counters (hw/model/cycles.py), including CAG group padding and requantizer stalls.
All kinds run at the same clock. Baselines use one accumulator slot and no padding.

    python -m hw.report [--metric lut|cmos] [--clock-mhz 300]
"""
from __future__ import annotations

import argparse
import json
import math

from hw.model.cycles import beats_per_product, tile_cycles
from hw.model.workload import LinearShape, sam_b_linears
from hw.syn.synth import AREA_JSON

PE_INPUTS = 8
FP32_LANES = 16
CAG_GROUPS = 4
HLUQ_SLOTS = 2
PAPER = {"fp32": 7.12, "int8": 33.82 / 16.34}
KINDS = {"fp32": "pe8_fp32", "int8": "pe8_int8", "int4": "pe8_hybrid4"}
CAVEATS = """Caveats: a simulated estimate. Linear layers only (no attention matmuls, softmax/LNQ,
neck convs); equal clock; PE datapaths only (the shared requantizer, buffers and control are outside the
budget); unlimited memory bandwidth; equal-size CAG groups; yosys generic / 7-series LUTs without DSPs,
whereas the paper's FP32 and INT8 designs use DSPs (1886 / 453), so LUT-only area overstates FP32 and INT8
cost. Absolute s/frame is for 8-input PEs and not comparable with the paper's FPS (its lanes are far
wider); only the ratios are."""
PAPER_PES = {"fp32": 16 // PE_INPUTS, "int8": 64 // PE_INPUTS, "int4": 128 // PE_INPUTS}


def layer_cycles(layer: LinearShape, n_pe: int, quantized_kinds: bool) -> int:
    """Cycles of one layer on n_pe parallel tile engines of PE_INPUTS lanes (output channels split)."""
    outs = math.ceil(layer.cout / n_pe)
    kind = layer.kind if quantized_kinds else "uniform"
    if kind == "cag":
        size = layer.cin // CAG_GROUPS
        beats = beats_per_product(layer.cin, PE_INPUTS, [size] * CAG_GROUPS)
        slots = CAG_GROUPS
    else:
        beats = beats_per_product(layer.cin, PE_INPUTS)
        slots = HLUQ_SLOTS if kind == "hluq" else 1
    return tile_cycles(layer.tokens, outs, beats, slots).cycles * layer.count


def estimate(area: dict, metric: str, clock_mhz: float, pes: dict[str, int] | None = None) -> dict:
    """PEs at equal area (or the given PE counts), total cycles, frame time and utilisation per kind."""
    layers = sam_b_linears()
    macs = sum(layer.macs for layer in layers)
    per_pe = {k: area[design][metric] for k, design in KINDS.items()}
    budget = per_pe["fp32"] * FP32_LANES / PE_INPUTS
    result = {}
    for kind in KINDS:
        n_pe = pes[kind] if pes else max(1, int(budget // per_pe[kind]))
        cycles = sum(layer_cycles(layer, n_pe, kind == "int4") for layer in layers)
        lanes = n_pe * PE_INPUTS
        result[kind] = {"pe_area": per_pe[kind], "pes": n_pe, "lanes": lanes, "cycles": cycles,
                        "seconds": cycles / (clock_mhz * 1e6), "utilisation": macs / (cycles * lanes)}
    return result


def _print(title: str, res: dict) -> None:
    print(title)
    print(f"{'kind':6s} {'PE area':>9s} {'lanes':>6s} {'Gcycles':>9s} {'util':>6s} {'s/frame':>8s}")
    for kind, r in res.items():
        print(f"{kind:6s} {r['pe_area']:9d} {r['lanes']:6d} {r['cycles'] / 1e9:9.3f} {r['utilisation']:6.1%} "
              f"{r['seconds']:8.2f}")
    for base, paper in PAPER.items():
        print(f"  INT4 HLUQ/CAG vs {base.upper()}: {res[base]['cycles'] / res['int4']['cycles']:.2f}x "
              f"(AHCQ-SAM FPGA: {paper:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", choices=("lut", "cmos"), default="lut")
    parser.add_argument("--clock-mhz", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not AREA_JSON.exists():
        raise SystemExit(f"{AREA_JSON.name} is missing: run `python -m hw.syn.synth --xilinx` first")
    area = json.loads(AREA_JSON.read_text())
    key = "xilinx_LUT" if args.metric == "lut" else "cmos_transistors"
    missing = [d for d in KINDS.values() if key not in area.get(d, {})]
    if missing:
        raise SystemExit(f"{AREA_JSON.name} has no {key} for {missing}: rerun hw.syn.synth "
                         "(with --xilinx for LUTs)")
    measured = {d: {args.metric: area[d][key]} for d in KINDS.values()}
    _print(f"SAM-B Linear layers at equal area (FP32 with {FP32_LANES} lanes), {key}, {args.clock_mhz:g} MHz",
           estimate(measured, args.metric, args.clock_mhz))
    _print("Same cycle model with the paper's lane counts 16 / 64 / 128 (area ratio pinned to the paper)",
           estimate(measured, args.metric, args.clock_mhz, pes=PAPER_PES))
    print(CAVEATS)

if __name__ == "__main__":
    main()
