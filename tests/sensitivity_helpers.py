"""A synthetic sensitivity file for a quantized model: the format ``tools/sensitivity.py`` writes, with
made-up but deterministic MACs and errors, so that allocation and config tests need no measurement run."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ahcq.analysis.sensitivity import quantizer_sites


def write_sensitivity(model: nn.Module, path: Path, bits: tuple[int, ...] = (4, 6, 8)) -> Path:
    """Every site of the quantized ``model`` with MACs ``1000 * (1 + i % 5)``, own error
    ``(1 + 7i % 11) * 2**-b`` and removed error ``1 - 0.01 * (3i % 13)`` at each width ``b``."""
    sites = []
    for i, site in enumerate(quantizer_sites(model)):
        by_bits = {str(b): {"alone_error": (1 + (7 * i) % 11) * 2.0**-b, "alone_ap_drop": 0.0,
                            "removed_error": 1.0 - 0.01 * ((3 * i) % 13), "removed_ap_gain": 0.0}
                   for b in bits}
        sites.append({"site": site.name, "kind": site.kind.value, "macs": 1000.0 * (1 + i % 5),
                      "quantizers": len(site.quantizers), "by_bits": by_bits})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "primary_bits": bits[0], "float": {}, "quantized": {},
                                "sites": sites}))
    return path
