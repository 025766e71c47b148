"""The packed quantized SAM: unpacking gives the packed model's masks bit for bit, 4-bit weights cost half
a byte, and a damaged, truncated, foreign or other-version file is refused by name."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ahcq.deploy import PackedFormatError, pack_model, read_packed, unpack_model
from ahcq.deploy.codes import pack_codes, packed_bytes, unpack_codes
from ahcq.deploy.packed import take
from ahcq.models import quantize_sam
from ahcq.models.half_weights import prepare_weights
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization import api
from ahcq.quantization.config import load_qconfig
from ahcq.quantization.quantizers import Mode
from ahcq.solver.calibration import switch_to_evaluation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_sam_quantize import batch, tiny_sam  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _quantized(preset: str):
    qconfig = load_qconfig(REPO / preset)
    sam = tiny_sam()
    inputs = batch(sam, n_boxes=3)
    quantize_sam(sam, qconfig)
    with torch.no_grad(), api.calibrating(sam):
        sam(inputs, multimask_output=False)
    switch_to_evaluation(sam)
    return sam, qconfig, inputs


def _outputs(sam, inputs):
    with torch.no_grad():
        out = sam(inputs, multimask_output=True)[0]
    return out["masks"], out["low_res_logits"], out["iou_predictions"]


@pytest.mark.parametrize("preset", ["exp/ours/w4a4.yaml", "exp/ptq4sam/w6a6.yaml", "exp/saqsam/w4a4.yaml",
                                    "exp/minmax/w5a5.yaml"])
def test_unpacked_model_gives_the_packed_models_outputs_bit_for_bit(preset, tmp_path):
    sam, qconfig, inputs = _quantized(preset)
    sizes = pack_model(sam, qconfig, True, tmp_path / "model.npz")
    unpacked, config, quant_encoder = unpack_model(tmp_path / "model.npz")
    assert quant_encoder and config.to_dict() == qconfig.to_dict()
    for a, b in zip(_outputs(sam, inputs), _outputs(unpacked, inputs)):
        assert torch.equal(a, b)
    assert sizes["bytes"] < sizes["fp32_bytes"]


def test_float16_weights_pack_the_float_layers_in_two_bytes_losslessly(tmp_path):
    qconfig = load_qconfig(REPO / "exp/minmax/w4a4.yaml")
    plain, _, inputs = _quantized("exp/minmax/w4a4.yaml")
    sam = tiny_sam()
    prepare_weights(sam, dataclasses.replace(qconfig, float16_weights=True))
    quantize_sam(sam, qconfig)
    with torch.no_grad(), api.calibrating(sam):
        sam(inputs, multimask_output=False)
    switch_to_evaluation(sam)
    sizes = {}
    for name, model in (("plain", plain), ("half", sam)):
        sizes[name] = pack_model(model, qconfig, True, tmp_path / f"{name}.npz")["bytes"]
    manifest, arrays = read_packed(tmp_path / "half.npz")
    floats = {t["name"]: t["array"] for t in manifest["tensors"]}
    assert floats["mask_decoder.iou_prediction_head.layers.0.weight"]["blob"] == "blob_float16"
    assert take(arrays, floats["mask_decoder.iou_prediction_head.layers.0.weight"]).dtype == np.float32
    unpacked, _, _ = unpack_model(tmp_path / "half.npz")
    for a, b in zip(_outputs(sam, inputs), _outputs(unpacked, inputs)):
        assert torch.equal(a, b)
    float_bytes = sum(4 * t.numel() for n, t in sam.mask_decoder.iou_prediction_head.state_dict().items())
    assert sizes["plain"] - sizes["half"] > float_bytes / 3


def test_weights_take_their_bit_width(tmp_path):
    sam, qconfig, _ = _quantized("exp/ours/w4a4.yaml")
    pack_model(sam, qconfig, True, tmp_path / "model.npz")
    manifest, arrays = read_packed(tmp_path / "model.npz")
    assert manifest["weights"]
    for w in manifest["weights"]:
        assert w["bits"] == 4 and take(arrays, w["codes"]).nbytes == packed_bytes(int(np.prod(w["shape"])), 4)
        layer = sam.get_submodule(w["name"])
        assert len(w["shape"]) == layer.weight.dim()
    names = {t["name"] for t in manifest["tensors"]}
    assert not any(n.endswith((".weight_quantizer.alpha", ".range_sample")) for n in names)
    assert not any(f"{w['name']}.weight" in names for w in manifest["weights"])


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_densely_and_round_trip(bits):
    rng = np.random.default_rng(bits)
    for qmin in (0, -(2 ** (bits - 1))):
        codes = rng.integers(qmin, qmin + 2**bits, 1001)
        packed = pack_codes(codes, bits, qmin)
        assert packed.dtype == np.uint8 and packed.size == -(-1001 * bits // 8)
        assert np.array_equal(unpack_codes(packed, bits, qmin, 1001), codes)
    assert pack_codes(np.array([1, 2, 15, 0]), 4, 0).tolist() == [0x21, 0x0F]  # two codes a byte, low first
    with pytest.raises(ValueError, match="outside"):
        pack_codes(np.array([2**bits]), bits, 0)


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory) -> Path:
    sam, qconfig, _ = _quantized("exp/minmax/w4a4.yaml")
    path = tmp_path_factory.mktemp("packed") / "model.npz"
    pack_model(sam, qconfig, True, path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    np.savez(dst, **arrays)
    return dst


def test_damaged_truncated_foreign_and_other_version_files_are_refused(packed_file, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(packed_file.read_bytes()[: packed_file.stat().st_size // 2])
    with pytest.raises(PackedFormatError, match="truncated or damaged"):
        unpack_model(truncated)

    def flip(arrays):
        manifest = json.loads(arrays["manifest"].tobytes())
        ref = manifest["weights"][0]["codes"]
        arrays[ref["blob"]] = arrays[ref["blob"]].copy()
        arrays[ref["blob"]][ref["offset"]] ^= 1
    with pytest.raises(PackedFormatError, match="checksum mismatch"):
        unpack_model(_rewrite(packed_file, tmp_path / "flipped.npz", flip))

    def manifest_edit(drop=(), **changes):
        def edit(arrays):
            manifest = {**json.loads(arrays["manifest"].tobytes()), **changes}
            manifest = {k: v for k, v in manifest.items() if k not in drop}
            arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        return edit
    with pytest.raises(PackedFormatError, match="version 3; this ahcq reads version 2"):
        unpack_model(_rewrite(packed_file, tmp_path / "v3.npz", manifest_edit(version=3)))
    with pytest.raises(PackedFormatError, match="not an ahcq-packed file"):
        unpack_model(_rewrite(packed_file, tmp_path / "other.npz", manifest_edit(format="other")))
    with pytest.raises(PackedFormatError, match=r"manifest lacks \['weights'\]"):
        unpack_model(_rewrite(packed_file, tmp_path / "partial.npz", manifest_edit(drop=("weights",))))
    with pytest.raises(PackedFormatError, match="no such packed file"):
        unpack_model(tmp_path / "absent.npz")


def test_an_uncalibrated_or_half_quantized_model_is_not_packed(tmp_path):
    sam, qconfig, _ = _quantized("exp/minmax/w4a4.yaml")
    first = next(q for _, q in api.iter_quantizers(sam))
    first.set_mode(Mode.OFF)
    with pytest.raises(api.NotFullyQuantizedError):
        pack_model(sam, qconfig, True, tmp_path / "model.npz")
    assert not (tmp_path / "model.npz").exists()


def test_info_checks_the_file_and_says_what_it_holds(packed_file, tmp_path, capsys):
    from ahcq.deploy.__main__ import main

    assert main(["info", str(packed_file), "--rebuild"]) == 0
    out = capsys.readouterr().out
    assert "ahcq-packed v2, checksum ok" in out and "at 4 bits" in out and "rebuilt" in out
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    assert main(["info", str(broken)]) == 1
    assert "truncated or damaged" in capsys.readouterr().err


def test_a_mixed_precision_run_unpacks_to_its_allocation_without_the_sensitivity_file(tmp_path):
    """The allocation travels in the packed file: float sites stay float, 6- and 8-bit sites keep their
    width, and the outputs are the packed model's bit for bit."""
    config = tmp_path / "mixed.yaml"
    config.write_text(f"base: {REPO / 'exp/minmax/w4a4.yaml'}\nmixed:\n"
                      f"  sensitivity: {REPO / 'exp/ours/sensitivity_testbed.json'}\n  float_sites: 1\n"
                      "  bits: [4, 6, 8]\n  budget_bits: 5\n")
    qconfig = load_qconfig(config)
    torch.manual_seed(0)
    sam = build_tiny_sam()  # the testbed's architecture, which the sensitivity file's sites name
    inputs = batch(sam, n_boxes=3)
    quantize_sam(sam, qconfig)
    with torch.no_grad(), api.calibrating(sam):
        sam(inputs, multimask_output=False)
    switch_to_evaluation(sam)
    pack_model(sam, qconfig, True, tmp_path / "model.npz")
    unpacked, config_back, _ = unpack_model(tmp_path / "model.npz")
    assert config_back.mixed.allocation == qconfig.mixed.allocation
    widths = {q.bits for _, q in api.iter_quantizers(unpacked)}
    assert {4, 6, 8} <= widths
    for a, b in zip(_outputs(sam, inputs), _outputs(unpacked, inputs)):
        assert torch.equal(a, b)
