"""``results.json`` (written atomically, strict JSON) and the printed float-vs-quantized table."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_NAME", "format_table", "write_json"]

RESULTS_NAME = "results.json"
_ROWS = ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "bbox_mAP")


def _strict(value: Any) -> Any:
    """NaN and infinities are not JSON: record them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write strict JSON (NaN and infinities as null) via a temporary file and ``os.replace``, readable by
    everyone the folder allows; a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Float vs quantized COCO AP (x100) side by side, with the difference; the quantized model's numbers in
    ONNX Runtime in a last column when the run evaluated it there (``--backend onnxruntime``)."""
    fp, quant, ort = results.get("fp"), results.get("quant"), results.get("onnxruntime")
    lines = [f"{'metric':<14}{'float':>8}{'quant':>8}{'delta':>8}" + (f"{'onnxrt':>8}" if ort else "")]
    for key in _ROWS:
        a = fp.get(key) if fp else None
        b = quant.get(key) if quant else None
        delta = b - a if a is not None and b is not None else None
        extra = f"{_cell(ort.get(key)):>8}" if ort else ""
        lines.append(f"{key:<14}{_cell(a):>8}{_cell(b):>8}{_cell(delta):>8}{extra}")
    return "\n".join(lines)
