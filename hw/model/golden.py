"""Bit-exact integer model of the accelerator datapath, compiled from a contract §4 export.

Integer decomposition of one output (o) of y = x̂ ŵᵀ + b. Weights are per-output-channel affine,
ŵ_oc = sw_o·W_oc with W_oc = w_codes − w_zero_point (a signed 9-bit integer, formed offline).

Uniform / CAG input (x̂_c = s_g(c)·(q_c − z_g(c)), groups made contiguous by a stable sort on x_group,
each group padded to a whole beat of LANES channels with W = 0; the lanes subtract the beat's group zero
point from the code before multiplying, so the zero-point weight sums Σ_{c∈g} W_oc are never needed)::

    Σ_c x̂_c W_oc = Σ_g s_g·A_og,   A_og = Σ_{c∈g} (q_c − z_g) W_oc   (one multiply accumulator per group)

HLUQ input (codes < n_log: log region, û = s1·2^(c−(n_log−1)), code 0 ↔ û = 0; codes ≥ n_log: uniform,
û = s1 + j·s2 with j = c − n_log + 1; x̂ = û + x_min)::

    Σ_c x̂_c W_oc = s2·U_o + s1·2^−F·L_o + K_o
        U_o = Σ_uniform j_c W_oc                  multiply path
        L_o = Σ_log,c≠0 floor(W_oc·2^(F−k_c))    shift path, k_c = n_log−1−c, F = LOG_FRAC fraction bits
              + 2^F·Σ_uniform W_oc               s1 offsets of uniform entries: the shift path passes W·2^F
                                                 for them (a data-dependent weight sum on the same scale)
        K_o = x_min·Σ_c W_oc                      offline weight sum

L_o is exact whenever n_log − 2 ≤ F (all 4-bit layers); otherwise each log term is floored to 2^−F·s1.

Dequant / requant (purely integer, constants computed here in float64). Each accumulator slot k has a
scale σ_k (the group scales; or s2 and s1·2^−F); σ_ref = max σ_k. A 16-bit mantissa and a right shift put
every slot on one grid of σ_ref·2^−15::

    D = Σ_k rhu(ACC_k·m_k, e_k),          m_k·2^−e_k ≈ (σ_k/σ_ref)·2^15
    out = clamp(rhu(D·M_o + C_o, n_o), qmin, qmax)
          M_o·2^−n_o ≈ sw_o·σ_ref·2^−15/so_o   (31-bit mantissa)
          C_o = rhu((sw_o·K_o + b_o)/so_o·2^n_o) + zo·2^n_o        (K_o = 0 for uniform/CAG)

with rhu(v, e) = floor(v/2^e + 1/2) (round half up, never half to even). The output zero point, the bias
and the HLUQ x_min weight sum are folded into C_o. Without an output quantizer the output is fixed point:
so = 2^(⌊log2 max|y_ref|⌋ − 24), zo = 0, clamp to int32.

Tolerance against the float reference y_ref (stated and tested): with an output quantizer the codes are
within ±1 of clamp(rhu(y_ref/so) + zo); without one |out·so − y_ref| ≤ 2^−12·max|y_ref|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw.model.fixedpoint import check_signed_range, mantissa_shift, round_half_up_int, rshift_round_half_up

LOG_FRAC = 16
X_BITS = 8
W_BITS = 9
ACC_BITS = 48
D_BITS = 64
V_BITS = 112
OUT_BITS = 32
SLOT_MANT_BITS = 16
OUT_MANT_BITS = 31
MAX_SLOTS = 8
MAX_SLOT_SHIFT = 62
MAX_OUT_SHIFT = V_BITS - 2
D_FRAC = SLOT_MANT_BITS - 1
FIXED_POINT_BITS = 24

MODE_UNIFORM = 0
MODE_HLUQ = 1


@dataclass
class Program:
    """Everything the RTL consumes for one tile, in the channel order it streams."""

    lanes: int
    mode: int
    n_log: int
    perm: np.ndarray
    beat_group: np.ndarray
    x: np.ndarray
    w: np.ndarray
    slot_mant: list[int]
    slot_shift: list[int]
    out_mult: list[int]
    out_shift: list[int]
    out_bias: list[int]
    qmin: int
    qmax: int
    out_scale: np.ndarray
    out_zero: int
    slot_zero: list[int]

    @property
    def n_slots(self) -> int:
        return len(self.slot_mant)

    @property
    def n_beats(self) -> int:
        return self.x.shape[1] // self.lanes


def load_layer(layer: dict | str | Path) -> dict:
    """An export as a dict: the .npz file of contract §4, or the same dict already in memory."""
    if isinstance(layer, dict):
        return layer
    with np.load(layer) as data:
        return {key: data[key] for key in data.files}


def compile_layer(layer: dict | str | Path, lanes: int) -> Program:
    """Reorder channels by group, pad to beats and compute every integer constant of the datapath."""
    layer = load_layer(layer)
    kind = str(layer["x_kind"])
    codes = np.asarray(layer["x_codes"], dtype=np.int64)
    w_zero = np.asarray(layer["w_zero_point"], dtype=np.int64)[:, None]
    w_int = np.asarray(layer["w_codes"], dtype=np.int64) - w_zero
    check_signed_range("weight code minus zero point", w_int, W_BITS)
    sw = np.asarray(layer["w_scale"], dtype=np.float64)
    bias = np.asarray(layer["bias"], dtype=np.float64)
    if kind == "hluq":
        mode, n_log = MODE_HLUQ, int(layer["n_log"])
        if not 1 <= n_log < 1 << X_BITS:
            raise ValueError(f"n_log {n_log} outside [1, {(1 << X_BITS) - 1}]")
        group = np.zeros(codes.shape[1], dtype=np.int64)
        s1, s2 = float(layer["s1"]), float(layer["s2"])
        scales = [s2, s1 * 2.0**-LOG_FRAC]
        k_dot = float(layer["x_min"]) * w_int.sum(axis=1)
    elif kind in ("uniform", "cag"):
        mode, n_log = MODE_UNIFORM, 0
        group = np.asarray(layer["x_group"], dtype=np.int64)
        scales = [float(s) for s in np.asarray(layer["x_scale"], dtype=np.float64)]
        zero = np.asarray(layer["x_zero_point"], dtype=np.int64)
        qmin = int(layer["x_qmin"]) if "x_qmin" in layer else min(int(codes.min()), 0)
        offset = -qmin if qmin < 0 else 0
        codes, zero = codes + offset, zero + offset
        if zero.min() < 0 or zero.max() >= 1 << X_BITS:
            raise ValueError(f"activation zero points outside [0, {1 << X_BITS})")
        k_dot = np.zeros(w_int.shape[0])
    else:
        raise ValueError(f"unknown x_kind {kind!r}")
    if codes.min() < 0 or codes.max() >= 1 << X_BITS:
        raise ValueError(f"activation codes outside [0, {1 << X_BITS})")
    if not 1 <= len(scales) <= MAX_SLOTS:
        raise ValueError(f"{len(scales)} accumulator slots, the datapath has {MAX_SLOTS}")
    perm, beat_group = _group_order(group, len(scales) if mode == MODE_UNIFORM else 1, lanes)
    valid = perm >= 0
    x = np.where(valid[None, :], codes[:, np.maximum(perm, 0)], 0)
    w = np.where(valid[None, :], w_int[:, np.maximum(perm, 0)], 0)
    s_ref = max(scales)
    slot_mant, slot_shift = [], []
    for s in scales:
        mant, shift = mantissa_shift(s / s_ref, SLOT_MANT_BITS)
        slot_mant.append(mant)
        slot_shift.append(_checked_shift("slot", shift - D_FRAC, MAX_SLOT_SHIFT))
    so, zo, qmin, qmax = _output_grid(layer)
    out_mult, out_shift, out_bias = [], [], []
    for o in range(w_int.shape[0]):
        mult, shift = mantissa_shift(sw[o] * s_ref * 2.0**-D_FRAC / so[o], OUT_MANT_BITS)
        shift = _checked_shift("output", shift, MAX_OUT_SHIFT)
        out_mult.append(mult)
        out_shift.append(shift)
        out_bias.append(round_half_up_int((sw[o] * k_dot[o] + bias[o]) / so[o] * 2.0**shift) + (zo << shift))
    slot_zero = [int(z) for z in zero] if mode == MODE_UNIFORM else [0] * len(scales)
    return Program(lanes, mode, n_log, perm, beat_group, x, w, slot_mant, slot_shift, out_mult, out_shift,
                   out_bias, qmin, qmax, so, zo, slot_zero)


def _checked_shift(what: str, shift: int, top: int) -> int:
    if not 0 <= shift <= top:
        raise ValueError(f"{what} shift {shift} outside [0, {top}]: scale ratio out of range")
    return shift


def _group_order(group: np.ndarray, n_groups: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel order (−1 = padding), each group contiguous and padded to whole beats; group id per beat."""
    order, beat_group = [], []
    for g in range(n_groups):
        chans = np.flatnonzero(group == g)
        n_beats = -(-len(chans) // lanes)
        order.append(np.concatenate([chans, -np.ones(n_beats * lanes - len(chans), dtype=np.int64)]))
        beat_group.extend([g] * n_beats)
    return np.concatenate(order).astype(np.int64), np.asarray(beat_group, dtype=np.int64)


def _output_grid(layer: dict) -> tuple[np.ndarray, int, int, int]:
    """Output scale per channel, zero point and clamp range; a power-of-two fixed-point grid without one."""
    cout = np.asarray(layer["w_codes"]).shape[0]
    if "o_scale" in layer:
        so = np.broadcast_to(np.asarray(layer["o_scale"], dtype=np.float64), (cout,)).copy()
        zo = int(np.asarray(layer["o_zero_point"]).reshape(-1)[0])
        if "o_qmin" in layer:
            return so, zo, int(layer["o_qmin"]), int(layer["o_qmax"])
        levels = 1 << int(layer["o_bits"])
        signed = "o_codes" in layer and int(np.min(layer["o_codes"])) < 0
        qmin, qmax = (-(levels // 2), levels // 2 - 1) if signed else (0, levels - 1)
        return so, zo, qmin, qmax
    peak = float(np.max(np.abs(layer["y_ref"]))) or 1.0
    so = np.full(cout, 2.0 ** (math.floor(math.log2(peak)) - FIXED_POINT_BITS))
    return so, 0, -(1 << (OUT_BITS - 1)), (1 << (OUT_BITS - 1)) - 1


def lane_terms(prog: Program, x: np.ndarray, w: np.ndarray, zero: int = 0) -> dict[str, np.ndarray]:
    """Multiply-path and shift-path sums [N, Cout] of some columns, as the lanes and adder trees form them."""
    if prog.mode == MODE_UNIFORM:
        return {"mul": (x - zero) @ w.T}
    uniform = x >= prog.n_log
    j = np.where(uniform, x - prog.n_log + 1, 0)
    shift_k = np.where(uniform, 0, np.minimum(prog.n_log - 1 - x, LOG_FRAC + W_BITS))
    active = uniform | (x != 0)
    shift_acc = np.zeros((x.shape[0], w.shape[0]), dtype=np.int64)
    for k in np.unique(shift_k[active]):
        mask = (active & (shift_k == k)).astype(np.int64)
        shift_acc += mask @ ((w << LOG_FRAC) >> int(k)).T
    return {"mul": j @ w.T, "shift": shift_acc}


def accumulate(prog: Program) -> np.ndarray:
    """Accumulator slots [N, Cout, n_slots] at the end of each dot product."""
    n, cout = prog.x.shape[0], prog.w.shape[0]
    acc = np.zeros((n, cout, prog.n_slots), dtype=np.int64)
    if prog.mode == MODE_HLUQ:
        terms = lane_terms(prog, prog.x, prog.w)
        acc[..., 0], acc[..., 1] = terms["mul"], terms["shift"]
    else:
        cols = np.repeat(prog.beat_group, prog.lanes)
        for g in range(prog.n_slots):
            sel = cols == g
            acc[..., g] = lane_terms(prog, prog.x[:, sel], prog.w[:, sel], prog.slot_zero[g])["mul"]
    check_signed_range("accumulator", acc, ACC_BITS)
    return acc


def requantize(prog: Program, acc: np.ndarray) -> np.ndarray:
    """Integer dequant + requant of accumulator slots to output codes [N, Cout] (int64)."""
    acc = acc.astype(object)
    dot = sum(rshift_round_half_up(acc[..., k] * prog.slot_mant[k], prog.slot_shift[k])
              for k in range(prog.n_slots))
    check_signed_range("slot sum D", dot, D_BITS)
    v = dot * np.asarray(prog.out_mult, dtype=object) + np.asarray(prog.out_bias, dtype=object)
    check_signed_range("requant product", v, V_BITS)
    out = rshift_round_half_up(v, np.asarray(prog.out_shift, dtype=object))
    return np.clip(out, prog.qmin, prog.qmax).astype(np.int64)


def run_layer(layer: dict | str | Path, lanes: int) -> tuple[Program, np.ndarray]:
    """Compile and execute: the output codes (or fixed-point values) the RTL must reproduce."""
    prog = compile_layer(layer, lanes)
    return prog, requantize(prog, accumulate(prog))


def dequantized(prog: Program, out: np.ndarray) -> np.ndarray:
    """Float64 value of output codes on the program's output grid."""
    return (out - prog.out_zero) * prog.out_scale[None, :]
