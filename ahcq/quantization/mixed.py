"""Float fallback and mixed precision from measured per-site sensitivities (``tools/sensitivity.py``).

A sensitivity file lists a model's quantizer sites (a layer, or an attention's q/k/v/prob slots), their
multiply-accumulates per image and, per measured bit width, ``alone_error`` (the output error with only that
site quantized) and ``removed_error`` (the fully quantized model's error with that site back in float).

- Float fallback: the ``float_sites`` sites whose removal lowers the fully quantized model's error most.
- Bit allocation: one width per remaining site from ``bits``, minimising the sum of the sites' own errors
  (an additive proxy, as Mix-QSAM and HAWQ use) under a budget, solved exactly as a 0-1 integer program
  (``scipy.optimize.milp``): ``x[s, b]`` in {0, 1}, one width per site, ``sum cost(s, b) x[s, b] <= budget``.
  ``average_bits``: ``cost = macs(s) * b`` within ``budget_bits * sum macs`` (the bits of the average
  multiply's operands); ``bops``: ``cost = macs(s) * b**2`` within ``budget_bits**2 * sum macs`` (bit
  operations, as uniform ``budget_bits``-bit weights and activations would spend).

The result is an ``Allocation``: per site a width, or ``None`` for float, that ``recipe.user_overrides``
turns into per-site overrides (a layer's input and weight, an attention's slots).
"""
from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Allocation", "Budget", "SiteKind", "SiteSensitivity", "allocate", "read_sensitivity",
           "site_patterns"]

FLOAT_BITS = 32  # a float site's operands, in the reported averages


class Budget(str, enum.Enum):
    """What the allocation's budget bounds."""

    AVERAGE_BITS = "average_bits"
    BOPS = "bops"


class SiteKind(str, enum.Enum):
    """What a site is: a quantized layer (its input and weight), or an attention twin's q/k/v/prob slots."""

    LAYER = "layer"
    ATTENTION = "attention"


@dataclass(frozen=True)
class SiteSensitivity:
    """One site of a sensitivity file: name, kind, MACs per image, and per width its own error and the
    quantized model's error without it."""

    site: str
    kind: SiteKind
    macs: float
    alone_error: dict[int, float]
    removed_error: dict[int, float]


@dataclass(frozen=True)
class Allocation:
    """Per site ``(site, kind, bits or None for float)``, with the average bits and the BOPs-equivalent
    bits it spends (float sites at ``FLOAT_BITS``) and the summed own error of the quantized sites."""

    sites: tuple[tuple[str, SiteKind, int | None], ...]
    average_bits: float
    bops_bits: float
    error: float

    def as_dict(self) -> dict[str, Any]:
        return {"sites": {s: b for s, _, b in self.sites}, "average_bits": round(self.average_bits, 4),
                "bops_bits": round(self.bops_bits, 4), "summed_alone_error": self.error}


def read_sensitivity(path: str | Path) -> list[SiteSensitivity]:
    """The sites of a ``tools/sensitivity.py`` ``results.json``; ``ValueError`` naming the file when it is
    missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such sensitivity file (write one with tools/sensitivity.py)")
    try:
        data = json.loads(path.read_text())
        return [SiteSensitivity(s["site"], SiteKind(s["kind"]), float(s["macs"]),
                                {int(b): float(m["alone_error"]) for b, m in s["by_bits"].items()},
                                {int(b): float(m["removed_error"]) for b, m in s["by_bits"].items()})
                for s in data["sites"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a sensitivity file of tools/sensitivity.py ({err})") from None


def _float_fallback(sites: Sequence[SiteSensitivity], k: int, base_bits: int) -> set[str]:
    """The ``k`` sites whose removal lowers the quantized model's error most, at ``base_bits``."""
    if k > len(sites):
        raise ValueError(f"float_sites {k}: the sensitivity file has {len(sites)} sites")
    if k and any(base_bits not in s.removed_error for s in sites):
        raise ValueError(f"float_sites needs removed errors measured at {base_bits} bits")
    ranked = sorted(sites, key=lambda s: s.removed_error[base_bits])
    return {s.site for s in ranked[:k]}


def _solve(sites: Sequence[SiteSensitivity], bits: Sequence[int], budget: Budget, budget_bits: float
           ) -> dict[str, int]:
    n, m = len(sites), len(bits)
    cost = np.array([[s.macs * (b if budget is Budget.AVERAGE_BITS else b * b) for b in bits] for s in sites])
    error = np.array([[s.alone_error[b] for b in bits] for s in sites])
    total = sum(s.macs for s in sites)
    limit = total * (budget_bits if budget is Budget.AVERAGE_BITS else budget_bits**2)
    one_each = np.kron(np.eye(n), np.ones(m))
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost.reshape(1, -1), -np.inf, limit)]
    res = milp(error.reshape(-1), constraints=constraints, integrality=np.ones(n * m), bounds=Bounds(0, 1))
    if not res.success:
        cheapest = (cost.min(axis=1).sum() / total)
        need = cheapest if budget is Budget.AVERAGE_BITS else math.sqrt(cheapest)
        raise ValueError(f"no allocation of widths {list(bits)} meets budget_bits {budget_bits} "
                         f"({budget.value}); the narrowest allocation needs {need:.3f}")
    choice = res.x.reshape(n, m).argmax(axis=1)
    return {s.site: bits[j] for s, j in zip(sites, choice)}


def allocate(sites: Sequence[SiteSensitivity], base_bits: int, float_sites: int = 0,
             bits: Sequence[int] = (), budget: Budget = Budget.AVERAGE_BITS, budget_bits: float = 5.0,
             ) -> Allocation:
    """Float fallback, then the bit allocation of the other sites (every site at ``base_bits`` when
    ``bits`` is empty)."""
    floated = _float_fallback(sites, float_sites, base_bits)
    rest = [s for s in sites if s.site not in floated]
    if bits:
        missing = sorted({b for b in bits for s in rest if b not in s.alone_error})
        if missing:
            raise ValueError(f"bits {missing} were not measured in the sensitivity file")
        widths = _solve(rest, list(bits), budget, budget_bits) if rest else {}
    else:
        widths = {s.site: base_bits for s in rest}
    chosen = {s.site: (None if s.site in floated else widths[s.site]) for s in sites}
    total = sum(s.macs for s in sites) or 1.0
    average = sum(s.macs * (chosen[s.site] or FLOAT_BITS) for s in sites) / total
    bops = math.sqrt(sum(s.macs * (chosen[s.site] or FLOAT_BITS) ** 2 for s in sites) / total)
    error = sum(s.alone_error.get(chosen[s.site], 0.0) for s in sites if chosen[s.site] is not None)
    return Allocation(tuple((s.site, s.kind, chosen[s.site]) for s in sites), average, bops, error)


def site_patterns(site: str, kind: SiteKind) -> str:
    """The override pattern that reaches exactly one site: a layer's module name, or an attention's
    q/k/v/prob slot quantizers (not its projection layers)."""
    if kind is SiteKind.ATTENTION:
        return f"re:{re.escape(site)}\\.(q|k|v|prob)_quantizer"
    return f"re:{re.escape(site)}"
