"""Float64 decoders of the export format (contract §1/§4): the independent reference for the integer path."""
from __future__ import annotations

import numpy as np


def decode_activations(layer: dict) -> np.ndarray:
    """x̂ [N, Cin] in float64 from the codes and the quantizer parameters of an exported layer."""
    codes = np.asarray(layer["x_codes"], dtype=np.float64)
    kind = str(layer["x_kind"])
    if kind in ("uniform", "cag"):
        group = np.asarray(layer["x_group"], dtype=np.int64)
        scale = np.asarray(layer["x_scale"], dtype=np.float64)[group]
        zero = np.asarray(layer["x_zero_point"], dtype=np.float64)[group]
        return scale * (codes - zero)
    if kind == "hluq":
        return decode_hluq(codes, float(layer["x_min"]), float(layer["s1"]), float(layer["s2"]),
                           int(layer["n_log"]))
    raise ValueError(f"unknown x_kind {kind!r}")


def decode_hluq(codes: np.ndarray, x_min: float, s1: float, s2: float, n_log: int) -> np.ndarray:
    """HLUQ decode: codes below n_log are the log region (code 0 is exactly x_min), the rest uniform."""
    log_u = np.where(codes == 0, 0.0, s1 * np.exp2(codes - (n_log - 1)))
    uni_u = s1 + (codes - n_log + 1) * s2
    return np.where(codes < n_log, log_u, uni_u) + x_min


def decode_weights(layer: dict) -> np.ndarray:
    """ŵ [Cout, Cin] in float64: per-output-channel scale and zero point."""
    w = np.asarray(layer["w_codes"], dtype=np.float64)
    scale = np.asarray(layer["w_scale"], dtype=np.float64)[:, None]
    zero = np.asarray(layer["w_zero_point"], dtype=np.float64)[:, None]
    return scale * (w - zero)


def reference_output(layer: dict) -> np.ndarray:
    """Float64 layer output from the decoded tensors: what y_ref approximates in float32."""
    return decode_activations(layer) @ decode_weights(layer).T + np.asarray(layer["bias"], dtype=np.float64)


def decode_lnq(codes: np.ndarray, clip: float, alpha: float, bits: int) -> np.ndarray:
    """LNQ decode of attention probabilities (contract §1): (exp(c/(L-1)·ln(1+α·clip)) − 1)/α."""
    top = np.log1p(alpha * clip)
    return np.expm1(np.asarray(codes, dtype=np.float64) / ((1 << bits) - 1) * top) / alpha
