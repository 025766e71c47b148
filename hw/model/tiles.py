"""Random tiles in the contract §4 export format: a stimulus source that needs no trained model.

Codes are drawn uniformly on each quantizer's grid and the parameters from ranges typical of SAM
linears; y_ref is the float64 product of the decoded tensors rounded to float32, exactly as an export
of a fake-quant layer would report it.
"""
from __future__ import annotations

import numpy as np

from hw.model.decode import reference_output


def random_tile(rng: np.random.Generator, kind: str, x_bits: int, groups: int = 1, n_tok: int = 8,
                cin: int = 32, cout: int = 8, w_bits: int | None = None, o_bits: int | None = 8) -> dict:
    """One exported-layer dict; kind is 'uniform', 'cag' or 'hluq'; o_bits None means no output quantizer."""
    w_bits = x_bits if w_bits is None else w_bits
    levels = 1 << x_bits
    layer: dict = {"format_version": np.int32(1), "x_kind": kind, "x_bits": np.int32(x_bits)}
    layer["x_codes"] = rng.integers(0, levels, size=(n_tok, cin)).astype(np.int32)
    if kind == "hluq":
        layer["x_min"] = np.float32(-0.17 * rng.uniform(0.5, 1.0))
        layer["s1"] = np.float32(rng.uniform(0.02, 0.2))
        layer["s2"] = np.float32(rng.uniform(0.2, 1.0) / levels)
        layer["n_log"] = np.int32(levels // 2)
    else:
        layer["x_scale"] = np.exp(rng.uniform(np.log(0.005), np.log(0.1), size=groups)).astype(np.float32)
        layer["x_zero_point"] = rng.integers(0, levels, size=groups).astype(np.int32)
        group = np.arange(cin) % groups
        layer["x_group"] = rng.permutation(group).astype(np.int32)
    layer.update(_random_weights(rng, w_bits, cin, cout))
    layer["bias"] = rng.normal(0.0, 0.1, size=cout).astype(np.float32)
    y = reference_output(layer)
    layer["y_ref"] = y.astype(np.float32)
    if o_bits is not None:
        layer.update(_output_grid(y, o_bits))
    return layer


def _random_weights(rng: np.random.Generator, w_bits: int, cin: int, cout: int) -> dict:
    """Half the output channels symmetric (signed codes, zero point 0), half asymmetric."""
    levels = 1 << w_bits
    symmetric = rng.random(cout) < 0.5
    lo = np.where(symmetric, -(levels // 2), 0)
    codes = lo[:, None] + rng.integers(0, levels, size=(cout, cin))
    zero = np.where(symmetric, 0, rng.integers(0, levels, size=cout))
    scale = np.exp(rng.uniform(np.log(0.002), np.log(0.03), size=cout))
    return {"w_bits": np.int32(w_bits), "w_codes": codes.astype(np.int32),
            "w_scale": scale.astype(np.float32), "w_zero_point": zero.astype(np.int32)}


def _output_grid(y: np.ndarray, o_bits: int) -> dict:
    """Asymmetric per-tensor grid over the output range, and the codes a fake-quant export would hold."""
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    qmax = (1 << o_bits) - 1
    scale = np.float32(max(hi - lo, 1e-6) / qmax)
    zero = np.int32(np.clip(np.round(-lo / scale), 0, qmax))
    codes = np.clip(np.round(y / scale) + zero, 0, qmax).astype(np.int32)
    return {"o_bits": np.int32(o_bits), "o_scale": scale, "o_zero_point": zero, "o_codes": codes}


def slice_tile(layer: dict, tokens: slice, outputs: slice) -> dict:
    """A tokens × outputs tile of an exported layer (all input channels), in the same format."""
    per_out = ("w_codes", "w_scale", "w_zero_point", "bias")
    tile = {}
    for key, value in layer.items():
        value = np.asarray(value)
        if key == "x_codes":
            value = value[tokens]
        elif key in ("y_ref", "o_codes"):
            value = value[tokens, outputs]
        elif key in per_out:
            value = value[outputs]
        tile[key] = value
    return tile
