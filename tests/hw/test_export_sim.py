"""Layers quantized and exported by ahcq (HLUQ MLP lin2, CAG decoder q-projection) through the golden model
(stated tolerances) and the RTL (bit-exact) on both simulators."""
from __future__ import annotations

import numpy as np
import pytest

from ahcq.hardware import synthetic_layers as export_layers
from hw.model.golden import compile_layer, dequantized, load_layer, run_layer
from hw.model.tiles import slice_tile
from hw.tb.sim import HARNESS_LANES, SIMULATORS, run_tiles, unavailable_reason


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """The three layers as read back from the .npz files written by ahcq's export."""
    folder = tmp_path_factory.mktemp("export")
    export_layers.export_mlp_lin2(folder / "lin2.npz", n_tok=8)
    export_layers.export_mlp_lin2(folder / "lin2_msb.npz", n_tok=8, level_splits=(1 / 2,))
    export_layers.export_decoder_q_proj(folder / "q_proj.npz")
    return {"lin2 hluq searched": load_layer(folder / "lin2.npz"),
            "lin2 hluq msb": load_layer(folder / "lin2_msb.npz"),
            "q_proj cag": load_layer(folder / "q_proj.npz")}


def test_exported_layers_within_tolerance(exported: dict[str, dict]) -> None:
    for name, layer in exported.items():
        prog, out = run_layer(layer, HARNESS_LANES)
        y = layer["y_ref"].astype(np.float64)
        if "o_codes" in layer:
            assert np.abs(out - layer["o_codes"]).max() <= 1, name
        else:
            assert np.abs(dequantized(prog, out) - y).max() <= 2.0**-12 * np.abs(y).max(), name
    assert int(exported["lin2 hluq msb"]["n_log"]) == 2 ** (int(exported["lin2 hluq msb"]["x_bits"]) - 1)


@pytest.mark.parametrize("sim", SIMULATORS)
def test_exported_tiles_bit_exact(sim: str, exported: dict[str, dict], tmp_path) -> None:
    reason = unavailable_reason(sim)
    if reason:
        pytest.skip(reason)
    programs = []
    for name, layer in exported.items():
        tile = slice_tile(layer, slice(0, 4), slice(0, 8))
        programs.append((f"{name} tile 4x{layer['x_codes'].shape[1]}x8", compile_layer(tile, HARNESS_LANES)))
    run_tiles(sim, programs, tmp_path)
