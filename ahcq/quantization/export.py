"""Integer export for the hardware: codes, scales, zero points and groups of one layer, as ``.npz``.

``export_linear(layer, x, path, next_quantizer=None)`` writes, for a calibrated ``QuantLinear`` and an input
batch ``x`` ``[N, Cin]`` (``format_version = 1``; ``L = 2**bits``):

- ``format_version`` int32 scalar, 1.
- ``x_kind`` str: ``uniform``, ``cag`` or ``hluq``; ``x_bits`` int32; ``x_codes`` int32 ``[N, Cin]``.
- uniform / CAG: ``x_scale`` f32 ``[G]``, ``x_zero_point`` int32 ``[G]``, ``x_group`` int32 ``[Cin]``
  (channel -> group; per tensor ``G = 1`` and every channel in group 0; per channel ``G = Cin``),
  ``x_qmin``, ``x_qmax`` int32 (the code range).
- HLUQ: ``x_min``, ``s1``, ``s2`` f32, ``n_log`` int32, ``x_levels`` f32 ``[L]`` (value of each code).
- ``w_bits`` int32, ``w_codes`` int32 ``[Cout, Cin]``, ``w_scale`` f32 ``[Cout]``, ``w_zero_point`` int32
  ``[Cout]`` (per output channel; a per-tensor grid is repeated), ``w_qmin``, ``w_qmax`` int32.
- ``bias`` f32 ``[Cout]`` (zeros when the layer has none).
- ``y_ref`` f32 ``[N, Cout]``: the fake-quant layer output, before any output quantizer.
- optional, with ``next_quantizer`` (per-tensor uniform): ``o_bits`` int32, ``o_scale`` f32,
  ``o_zero_point``, ``o_qmin``, ``o_qmax`` int32 and ``o_codes`` int32 ``[N, Cout]`` (``y_ref`` requantized).

Decoding: uniform/CAG ``x = (x_codes - x_zero_point[x_group]) * x_scale[x_group]``; HLUQ
``x = x_levels[x_codes]``; weights ``w = (w_codes - w_zero_point[:, None]) * w_scale[:, None]``; all
float32.
Before writing, export checks that every code is on its grid and that these decodings reproduce the
fake-quant tensors bit for bit, and that ``decode(x) @ decode(w).T + bias`` matches ``y_ref``
(``verify_linear_export``); any failure raises ``ExportError`` and nothing is written.

``export_attention_probs(quantizer, probs, path)`` writes an LNQ or AGQ attention-probability quantizer:
``format_version``, ``kind`` (``lnq``/``agq``), ``bits``, its parameters (``alpha``, ``clip`` or ``tau``,
``scale``), ``codes`` int32 (shape of ``probs``), ``levels`` f32 ``[2**bits]`` (the decode table, as held in
BRAM) and ``p_ref`` (the fake-quant probabilities, equal to ``levels[codes]``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .granularity import ChannelGroups, PerChannel, PerTensor
from .layers import QuantLinear
from .quantizers import HLUQuantizer, Quantizer
from .quantizers.grid import GridQuantizer
from .quantizers.probability import ProbabilityQuantizer

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "decode_input",
    "decode_weight",
    "export_attention_probs",
    "export_linear",
    "verify_linear_export",
]

FORMAT_VERSION = 1
Y_RTOL = 1e-5  # y_ref vs float64 re-computation, relative to sum |x||w| + |b| (float32 accumulation)


class ExportError(ValueError):
    """An export whose codes are off-grid or do not reproduce the fake-quant tensors."""


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _require_exact(decoded: np.ndarray, expected: torch.Tensor, what: str) -> None:
    exp = _np(expected).astype(np.float32)
    if decoded.shape != exp.shape:
        raise ExportError(f"{what}: decoded shape {decoded.shape} != fake-quant shape {exp.shape}")
    if not np.array_equal(decoded, exp):
        diff = np.abs(decoded.astype(np.float64) - exp.astype(np.float64)).max()
        raise ExportError(f"{what}: decoded codes do not reproduce the fake-quant tensor "
                          f"(max diff {diff:.3g})")


def _input_arrays(q: Quantizer, x: torch.Tensor) -> dict[str, np.ndarray]:
    codes = _np(q.quantize_int(x)).astype(np.int32)
    cin = x.shape[-1]
    if isinstance(q, HLUQuantizer):
        p = q.export()
        levels = _np(q.dequantize_int(torch.arange(2**q.bits, dtype=torch.int32))).astype(np.float32)
        return {"x_kind": np.array("hluq"), "x_bits": p["bits"], "x_codes": codes, "x_min": p["x_min"],
                "s1": p["s1"], "s2": p["s2"], "n_log": p["n_log"], "x_levels": levels}
    if not isinstance(q, GridQuantizer):
        raise ExportError(f"quantizer {q.name!r}: input kind {q.family!r} cannot be exported "
                          "(uniform, cag or hluq only)")
    p = q.export()
    granularity = q.granularity
    if isinstance(granularity, ChannelGroups):
        kind, group = "cag", p["group_index"]
    elif isinstance(granularity, PerTensor):
        kind, group = "uniform", np.zeros(cin, dtype=np.int32)
    elif granularity.axis in (-1, x.dim() - 1):
        kind, group = "cag", np.arange(cin, dtype=np.int32)
    else:
        raise ExportError(f"quantizer {q.name!r}: per-channel input on axis {granularity.axis} is not the "
                          "last axis")
    return {"x_kind": np.array(kind), "x_bits": p["bits"], "x_codes": codes, "x_scale": p["scale"],
            "x_zero_point": p["zero_point"], "x_group": group.astype(np.int32),
            "x_qmin": p["qmin"], "x_qmax": p["qmax"]}


def _weight_arrays(q: Quantizer, w: torch.Tensor) -> dict[str, np.ndarray]:
    if not isinstance(q, GridQuantizer) or isinstance(q.granularity, ChannelGroups):
        raise ExportError(f"quantizer {q.name!r}: weight kind {q.family!r} cannot be exported")
    if q.granularity not in (PerTensor(), PerChannel(0)):
        raise ExportError(f"quantizer {q.name!r}: weights must be per tensor or per output channel (axis 0), "
                          f"got {q.granularity}")
    p = q.export()
    cout = w.shape[0]
    return {"w_bits": p["bits"], "w_codes": _np(q.quantize_int(w)).astype(np.int32),
            "w_scale": np.broadcast_to(p["scale"], (cout,)).astype(np.float32),
            "w_zero_point": np.broadcast_to(p["zero_point"], (cout,)).astype(np.int32),
            "w_qmin": p["qmin"], "w_qmax": p["qmax"]}


def decode_input(data: dict[str, np.ndarray]) -> np.ndarray:
    """Float32 input values of an export (see the module docstring)."""
    codes = data["x_codes"]
    if str(data["x_kind"]) == "hluq":
        return data["x_levels"][codes]
    group = data["x_group"]
    steps = (codes - data["x_zero_point"][group]).astype(np.float32)
    return (steps * data["x_scale"][group]).astype(np.float32)


def decode_weight(data: dict[str, np.ndarray]) -> np.ndarray:
    """Float32 weight values of an export."""
    codes = data["w_codes"]
    steps = (codes - data["w_zero_point"][:, None]).astype(np.float32)
    return (steps * data["w_scale"][:, None]).astype(np.float32)


def _check_range(codes: np.ndarray, lo: int, hi: int, what: str) -> None:
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ExportError(f"{what}: codes outside the grid [{lo}, {hi}] "
                          f"(min {codes.min()}, max {codes.max()})")


def verify_linear_export(data: dict[str, np.ndarray]) -> None:
    """Raise ``ExportError`` unless every code is on its grid and the decoded layer reproduces ``y_ref``."""
    if int(data["format_version"]) != FORMAT_VERSION:
        raise ExportError(f"format_version {int(data['format_version'])} != {FORMAT_VERSION}")
    if str(data["x_kind"]) == "hluq":
        _check_range(data["x_codes"], 0, 2 ** int(data["x_bits"]) - 1, "x_codes")
    else:
        _check_range(data["x_codes"], int(data["x_qmin"]), int(data["x_qmax"]), "x_codes")
        _check_range(data["x_group"], 0, data["x_scale"].size - 1, "x_group")
    _check_range(data["w_codes"], int(data["w_qmin"]), int(data["w_qmax"]), "w_codes")
    x = decode_input(data).astype(np.float64)
    w = decode_weight(data).astype(np.float64)
    bias = data["bias"].astype(np.float64)
    y = x @ w.T + bias
    bound = np.abs(x) @ np.abs(w).T + np.abs(bias)
    err = np.abs(y - data["y_ref"].astype(np.float64))
    if not np.all(err <= Y_RTOL * bound + 1e-30):
        worst = np.unravel_index(np.argmax(err - Y_RTOL * bound), err.shape)
        raise ExportError(f"y_ref does not match the decoded codes at {tuple(int(i) for i in worst)} "
                          f"(|diff| {err[worst]:.3g}, allowed {Y_RTOL * bound[worst]:.3g})")
    if "o_codes" in data:
        _check_range(data["o_codes"], int(data["o_qmin"]), int(data["o_qmax"]), "o_codes")


def _save(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file in the target folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def export_linear(
    layer: QuantLinear, x: torch.Tensor, path: str | os.PathLike, next_quantizer: Quantizer | None = None
) -> dict[str, np.ndarray]:
    """Export ``layer`` applied to ``x`` ``[N, Cin]`` to ``path`` (``.npz``); returns the arrays written."""
    if not isinstance(layer, QuantLinear):
        raise TypeError(f"export_linear needs a QuantLinear, got {type(layer).__name__}")
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"export_linear: x must be [N, {layer.in_features}], got {tuple(x.shape)}")
    if layer.input_quantizer is None or layer.weight_quantizer is None:
        raise ExportError("export_linear: the layer needs both an input and a weight quantizer")
    xq, wq = layer.input_quantizer, layer.weight_quantizer
    x = x.float()
    x_fq, w_fq = xq.fake_quant(x), wq.fake_quant(layer.weight)
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    y_ref = torch.nn.functional.linear(x_fq, w_fq, bias)
    data = {"format_version": np.array(FORMAT_VERSION, dtype=np.int32)}
    data.update(_input_arrays(xq, x))
    data.update(_weight_arrays(wq, layer.weight))
    data["bias"] = _np(bias).astype(np.float32)
    data["y_ref"] = _np(y_ref).astype(np.float32)
    _require_exact(decode_input(data), x_fq, f"quantizer {xq.name!r} (input)")
    _require_exact(decode_weight(data), w_fq, f"quantizer {wq.name!r} (weight)")
    if next_quantizer is not None:
        if not isinstance(next_quantizer, GridQuantizer) or next_quantizer.granularity != PerTensor():
            raise ExportError(f"quantizer {next_quantizer.name!r}: requantization needs a per-tensor uniform "
                              "quantizer")
        p = next_quantizer.export()
        o_codes = next_quantizer.quantize_int(y_ref)
        _require_exact(_np(next_quantizer.dequantize_int(o_codes)), next_quantizer.fake_quant(y_ref),
                       f"quantizer {next_quantizer.name!r} (output)")
        data.update({"o_bits": p["bits"], "o_scale": p["scale"].reshape(()),
                     "o_zero_point": p["zero_point"].reshape(()), "o_qmin": p["qmin"], "o_qmax": p["qmax"],
                     "o_codes": _np(o_codes).astype(np.int32)})
    verify_linear_export(data)
    _save(path, data)
    return data


@torch.no_grad()
def export_attention_probs(
    quantizer: Quantizer, probs: torch.Tensor, path: str | os.PathLike
) -> dict[str, np.ndarray]:
    """Export an LNQ or AGQ attention-probability quantizer applied to ``probs``; returns the arrays."""
    if not isinstance(quantizer, ProbabilityQuantizer):
        raise TypeError(f"export_attention_probs needs an LNQ or AGQ quantizer, "
                        f"got {type(quantizer).__name__}")
    p_ref = quantizer.fake_quant(probs.float())
    codes = _np(quantizer.quantize_int(probs.float())).astype(np.int32)
    all_codes = torch.arange(2**quantizer.bits, dtype=torch.int32)
    levels = _np(quantizer.dequantize_int(all_codes)).astype(np.float32)
    _check_range(codes, 0, levels.size - 1, f"quantizer {quantizer.name!r}")
    _require_exact(levels[codes], p_ref, f"quantizer {quantizer.name!r}")
    params = quantizer.export()
    data = {"format_version": np.array(FORMAT_VERSION, dtype=np.int32), **params,
            "codes": codes, "levels": levels, "p_ref": _np(p_ref).astype(np.float32)}
    _save(path, data)
    return data
