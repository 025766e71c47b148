"""Hex memory images for the simulation harness ($readmemh) and the parser for its $writememh output.

Word layouts (lane 0 in the least significant bits): x beat = LANES × 8-bit codes, w beat = LANES ×
9-bit two's-complement weights, group id per beat, per-output {C_o:112, n_o:8, M_o:32}, and a 32-entry
register image (see CFG_* addresses). The RTL reads these exact fields.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hw.model.golden import V_BITS, W_BITS, X_BITS, Program

CFG_MODE, CFG_N_LOG, CFG_N_SLOTS, CFG_N_TOK, CFG_N_OUT, CFG_N_BEATS, CFG_QMIN, CFG_QMAX = range(8)
CFG_SLOT_ZERO = 8
CFG_SLOT_MANT = 16
CFG_SLOT_SHIFT = 24
CFG_WORDS = 32


def pack_word(values, bits: int) -> int:
    """Concatenate two's-complement fields of `bits` bits, element 0 in the least significant bits."""
    word, mask = 0, (1 << bits) - 1
    for i, v in enumerate(values):
        word |= (int(v) & mask) << (i * bits)
    return word


def write_hex(path: Path, words, bits: int) -> None:
    """One word per line, zero-padded hex, as $readmemh reads it."""
    digits = -(-bits // 4)
    Path(path).write_text("".join(f"{int(w) & ((1 << bits) - 1):0{digits}x}\n" for w in words))


def read_hex(path: Path, bits: int, signed: bool = True) -> np.ndarray:
    """Parse $writememh output of either simulator (skips // comments and @address lines)."""
    values = []
    for line in Path(path).read_text().splitlines():
        for token in line.split("//")[0].split():
            if token.startswith("@"):
                continue
            v = int(token, 16)
            values.append(v - (1 << bits) if signed and v >> (bits - 1) else v)
    return np.asarray(values, dtype=np.int64)


def config_words(prog: Program) -> list[int]:
    """The register image the harness loads through the configuration port before start."""
    cfg = [0] * CFG_WORDS
    cfg[CFG_MODE], cfg[CFG_N_LOG], cfg[CFG_N_SLOTS] = prog.mode, prog.n_log, prog.n_slots
    cfg[CFG_N_TOK], cfg[CFG_N_OUT], cfg[CFG_N_BEATS] = prog.x.shape[0], prog.w.shape[0], prog.n_beats
    cfg[CFG_QMIN], cfg[CFG_QMAX] = prog.qmin & 0xFFFFFFFF, prog.qmax & 0xFFFFFFFF
    for k in range(prog.n_slots):
        cfg[CFG_SLOT_ZERO + k] = prog.slot_zero[k]
        cfg[CFG_SLOT_MANT + k] = prog.slot_mant[k]
        cfg[CFG_SLOT_SHIFT + k] = prog.slot_shift[k]
    return cfg


def write_program(prog: Program, folder: Path) -> dict[str, Path]:
    """Write every memory image of a program; returns the plusarg name → file mapping."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lanes, nb = prog.lanes, prog.n_beats
    files = {name: folder / f"{name.lower()}.hex" for name in ("XFILE", "WFILE", "GFILE", "PFILE", "CFILE")}
    write_hex(files["XFILE"], (pack_word(row[b * lanes:(b + 1) * lanes], X_BITS)
                               for row in prog.x for b in range(nb)), lanes * X_BITS)
    write_hex(files["WFILE"], (pack_word(row[b * lanes:(b + 1) * lanes], W_BITS)
                               for row in prog.w for b in range(nb)), lanes * W_BITS)
    write_hex(files["GFILE"], prog.beat_group, 3)
    write_hex(files["PFILE"], (pack_word([m, 0], 32) | (s << 32) | ((c & ((1 << V_BITS) - 1)) << 40)
                               for m, s, c in zip(prog.out_mult, prog.out_shift, prog.out_bias)), 40 + V_BITS)
    write_hex(files["CFILE"], config_words(prog), 32)
    files["OFILE"] = folder / "out.hex"
    return files

