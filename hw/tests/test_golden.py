"""Golden integer model: exact decomposition, stated tolerance vs y_ref, rounding, layout, error paths."""
from __future__ import annotations

import numpy as np
import pytest

from hw.model.decode import decode_activations, decode_weights, reference_output
from hw.model.fixedpoint import mantissa_shift, rshift_round_half_up
from hw.model.golden import LOG_FRAC, accumulate, compile_layer, dequantized, requantize, run_layer
from hw.model.memfiles import pack_word, read_hex, write_hex
from hw.model.tiles import random_tile

LANES = 8
CASES = [(kind, groups, bits) for bits in (4, 6, 8)
         for kind, groups in (("uniform", 1), ("cag", 4), ("cag", 8), ("hluq", 1))]


def dot_from_accumulators(layer: dict, prog, acc: np.ndarray) -> np.ndarray:
    """Σ_c x̂_c·(w_c − z_w) in float64 rebuilt from the integer accumulators with exact scales."""
    w_int = (layer["w_codes"] - layer["w_zero_point"][:, None]).astype(np.float64)
    if prog.mode == 1:
        s1, s2 = float(layer["s1"]), float(layer["s2"])
        const = float(layer["x_min"]) * w_int.sum(axis=1)
        return s2 * acc[..., 0] + s1 * 2.0**-LOG_FRAC * acc[..., 1] + const
    return (acc * layer["x_scale"].astype(np.float64)).sum(axis=-1)


@pytest.mark.parametrize("kind,groups,bits", CASES)
def test_integer_decomposition_is_exact(kind: str, groups: int, bits: int) -> None:
    """Accumulators × float64 scales equal the float64 dot product (HLUQ log lane exact while n_log−2 ≤ F)."""
    rng = np.random.default_rng(bits * 10 + groups)
    layer = random_tile(rng, kind, bits, groups, n_tok=6, cin=56, cout=7)
    prog = compile_layer(layer, LANES)
    got = dot_from_accumulators(layer, prog, accumulate(prog))
    w_int = layer["w_codes"] - layer["w_zero_point"][:, None]
    exact = decode_activations(layer) @ w_int.T.astype(np.float64)
    bound = np.abs(decode_activations(layer)) @ np.abs(w_int).T.astype(np.float64)
    exact_log = kind != "hluq" or int(layer["n_log"]) - 2 <= LOG_FRAC
    tol = 1e-12 if exact_log else 2.0**-LOG_FRAC * float(layer["s1"]) * w_int.shape[1] * 256
    assert np.all(np.abs(got - exact) <= tol * np.maximum(bound, 1.0)), np.abs(got - exact).max()


@pytest.mark.parametrize("kind,groups,bits", CASES)
def test_requantized_codes_within_one_lsb(kind: str, groups: int, bits: int) -> None:
    """Stated tolerance: output codes within ±1 of clamp(round_half_up(y_ref/so) + zo)."""
    layer = random_tile(np.random.default_rng(100 + bits + groups), kind, bits, groups, n_tok=12, cin=96,
                        cout=16, o_bits=8)
    prog, out = run_layer(layer, LANES)
    y = reference_output(layer)
    expect = np.clip(np.floor(y / prog.out_scale + 0.5) + prog.out_zero, prog.qmin, prog.qmax)
    assert np.abs(out - expect).max() <= 1
    assert np.abs(out - layer["o_codes"]).max() <= 1


@pytest.mark.parametrize("kind,groups,bits", CASES)
def test_fixed_point_output_within_tolerance(kind: str, groups: int, bits: int) -> None:
    """Stated tolerance without an output quantizer: |out·so − y_ref| ≤ 2^-12·max|y_ref|."""
    layer = random_tile(np.random.default_rng(200 + bits + groups), kind, bits, groups, n_tok=12, cin=96,
                        cout=16, o_bits=None)
    prog, out = run_layer(layer, LANES)
    err = np.abs(dequantized(prog, out) - layer["y_ref"]).max()
    assert err <= 2.0**-12 * np.abs(layer["y_ref"]).max()


def test_round_half_up_never_to_even() -> None:
    v = np.array([-5, -3, -1, 1, 3, 5], dtype=object)
    assert rshift_round_half_up(v, 1).tolist() == [-2, -1, 0, 1, 2, 3]
    assert np.round(np.array([0.5, 2.5])).tolist() == [0.0, 2.0]
    assert rshift_round_half_up(np.array([7], dtype=object), 0).tolist() == [7]


def test_mantissa_shift_normalised() -> None:
    for ratio in (1.0, 0.75, 2.0**-20, 3.0e-3, 0.99999999):
        mant, shift = mantissa_shift(ratio, 16)
        assert 1 << 15 <= mant < 1 << 16
        assert abs(mant * 2.0**-shift - ratio) <= 2.0**-16 * ratio


def test_group_permutation_is_required() -> None:
    """Negative test: streaming channels in natural order with the grouped beat ids gives wrong results."""
    layer = random_tile(np.random.default_rng(3), "cag", 6, 4, n_tok=5, cin=64, cout=6)
    prog, out = run_layer(layer, LANES)
    natural = compile_layer(layer, LANES)
    natural.x[:] = 0
    natural.w[:] = 0
    natural.x[:, :64] = layer["x_codes"]
    natural.w[:, :64] = layer["w_codes"] - layer["w_zero_point"][:, None]
    assert not np.array_equal(requantize(natural, accumulate(natural)), out)


def test_reference_uses_weight_zero_points() -> None:
    layer = random_tile(np.random.default_rng(4), "uniform", 4, 1, n_tok=2, cin=8, cout=3)
    w = decode_weights(layer)
    assert np.allclose(w, layer["w_scale"][:, None] * (layer["w_codes"] - layer["w_zero_point"][:, None]))


def test_compile_rejects_bad_layers() -> None:
    rng = np.random.default_rng(5)
    layer = random_tile(rng, "cag", 4, 4, n_tok=2, cin=16, cout=2)
    with pytest.raises(ValueError, match="x_kind"):
        compile_layer({**layer, "x_kind": "agq"}, LANES)
    wide = {**layer, "w_codes": layer["w_codes"] * 64}
    with pytest.raises(ValueError, match="9 bits"):
        compile_layer(wide, LANES)
    many = {**layer, "x_scale": np.ones(9, np.float32), "x_zero_point": np.zeros(9, np.int32)}
    with pytest.raises(ValueError, match="slots"):
        compile_layer(many, LANES)


def test_hex_round_trip_skips_simulator_annotations(tmp_path) -> None:
    path = tmp_path / "m.hex"
    write_hex(path, [pack_word([-1, 2], 9), 5], 18)
    text = path.read_text()
    path.write_text("// 0x00000000\n@0\n" + text)
    assert read_hex(path, 18, signed=False).tolist() == [(2 << 9) | 0x1FF, 5]
    assert read_hex(path, 18).tolist() == [(2 << 9) | 0x1FF, 5]
