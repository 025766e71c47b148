"""Markdown tables shaped like the papers': run tables filled from the cells' ``results.json``, and the
register-count table computed from the model structure.

A run entry shows the cell's metric (COCO AP x 100, one decimal), ``-`` when the cell has not run and
``fail`` when it failed in this invocation, so a partial grid still renders. An entry with one cell per
seed shows ``mean ± std`` (sample standard deviation) over its seeds, with ``(n/N)`` while some are missing.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ahcq.tables.grid import Cell, Plan, Ref, SpecError, TableSpec
from ahcq.tables.registers import Granularity, build_meta_sam, cag_sites, count_registers

__all__ = ["cell_value", "entry_text", "markdown", "render_plan", "render_registers"]

PENDING = "-"
FAILED = "fail"


def cell_value(cell: Cell, root: Path, metric: str) -> float | None:
    """The cell's metric from its results.json; None when the file is missing or incomplete."""
    path = cell.out_dir(root) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    section = results.get(cell.kind)
    return section.get(metric) if isinstance(section, dict) else None


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the others right-aligned."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _caption(title: str, caption: str) -> str:
    return f"### {title}\n\n{caption}\n\n" if caption else f"### {title}\n\n"


def entry_text(ref: Ref, values: dict[str, float], failed: set[str]) -> str:
    """One table entry from its cells' ``values`` (cell key -> metric) and the cells that ``failed``."""
    got = [values[k] for k in ref.keys if k in values]
    if not got:
        return FAILED if any(k in failed for k in ref.keys) else PENDING
    if len(ref.keys) == 1:
        return f"{got[0]:.1f}"
    text = f"{statistics.fmean(got):.1f}" + (f" ± {statistics.stdev(got):.1f}" if len(got) > 1 else "")
    return text if len(got) == len(ref.keys) else f"{text} ({len(got)}/{len(ref.keys)})"


def render_plan(plan: Plan, values: dict[str, float], failed: set[str] = frozenset()) -> str:
    """The plan as markdown; ``values`` maps cell keys to their metric, ``failed`` names failed cells."""
    rows = [[entry_text(e, values, failed) if isinstance(e, Ref) else e for e in row] for row in plan.rows]
    return _caption(plan.name, plan.caption) + markdown(plan.header, rows) + "\n"


def _granularities(groups: list[int]) -> list[Granularity]:
    return [Granularity("per-tensor", 0), Granularity("per-channel", None),
            *(Granularity(f"CAG, {g} groups", g) for g in groups)]


def _pct_fewer(part: int, whole: int) -> str:
    return f"{100.0 * (1 - part / whole):.1f} %"


def _arch_rows(label: str, sites: list[tuple[str, int]], groups: list[int], bits: int,
               scale_bits: int) -> tuple[list[list[str]], str]:
    counts = count_registers(sites, _granularities(groups), bits, scale_bits)
    per_channel = counts[1]
    rows = [[label, c.granularity, str(len(sites)), str(c.pairs), str(c.registers), str(c.bits),
             _pct_fewer(c.bits, per_channel.bits)] for c in counts]
    g = groups[0]
    widest = max(c for _, c in sites)
    one, widest_pc = min(g, widest) * (scale_bits + bits), widest * (scale_bits + bits)
    cag, pc = counts[2].bits, per_channel.bits
    note = (f"{label}: CAG with {g} groups at {bits} bits holds {min(g, widest)} x ({scale_bits} + {bits}) = "
            f"{one} register bits per quantizer; the widest CAG layer ({widest} channels) needs {widest_pc} "
            f"per channel, so {_pct_fewer(one, widest_pc)} fewer; over all {len(sites)} CAG-eligible "
            f"quantizers {pc} -> {cag} bits, {_pct_fewer(cag, pc)} fewer.")
    return rows, note


def render_registers(table: TableSpec, quant_encoder: bool) -> str:
    """Register counts per granularity for each ``archs`` entry (built on the meta device)."""
    raw = table.raw
    archs = raw.get("archs") or []
    groups = raw.get("groups", [4])
    bits, scale_bits = table.bits[0], int(raw.get("scale_bits", 32))
    if not archs or not isinstance(groups, list) or not all(isinstance(g, int) and g > 0 for g in groups):
        raise SpecError(f"table {table.name}: needs archs: [{{label, arch, sizes}}] and groups: [ints > 0]")
    rows: list[list[str]] = []
    notes: list[str] = []
    for a in archs:
        sam = build_meta_sam(str(a.get("arch")), _sizes(a.get("sizes")))
        label = str(a.get("label", a.get("arch")))
        arch_rows, note = _arch_rows(label, cag_sites(sam, quant_encoder), groups, bits, scale_bits)
        rows += arch_rows
        notes.append(note)
    header = ["Model", "Granularity", "Quantizers", "(scale, zp) pairs", "Registers", "Bits",
              "Bits vs per-channel"]
    body = markdown(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    return _caption(table.name, table.caption) + body + "\n"


def _sizes(sizes: Any) -> dict[str, Any] | None:
    """YAML lists -> tuples where the tiny SAM builder wants them."""
    if not sizes:
        return None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(sizes).items()}
