"""The quantized SAM exported to ONNX and run by ONNX Runtime: the integer Linear is the integer product of
the codes (checked against a float64 / int64 re-derivation), every uniform and CAG recipe's masks agree with
the fake-quant model's, 4-bit activation grids are clipped to their range, and quantizers with no standard
ONNX form are refused by name."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from ahcq.deploy import pack_model
from ahcq.deploy.__main__ import main as deploy_cli
from ahcq.deploy.onnx_export import EXPORTABLE_RECIPES, OnnxExportError, _export, export_onnx, onnx_ready
from ahcq.deploy.onnx_runtime import graph_ops, running_in_onnxruntime
from ahcq.models import quantize_sam
from ahcq.quantization import api
from ahcq.quantization.config import load_qconfig
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import FixedQuantizer, Role
from ahcq.quantization.quantizers.cag import CAGQuantizer
from ahcq.solver.calibration import switch_to_evaluation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_packed import REPO, _quantized  # noqa: E402


def _layer(cag: bool, a_bits: int) -> tuple[QuantLinear, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64) * torch.linspace(0.05, 4.0, 64)  # channel ranges differ: CAG's groups differ
    xq = (CAGQuantizer(Role.INPUT, a_bits, groups=4, name="x") if cag
          else FixedQuantizer(Role.INPUT, a_bits, name="x"))
    wq = FixedQuantizer(Role.WEIGHT, 4, ch_axis=0, name="w")
    layer = QuantLinear.from_float(nn.Linear(64, 24), input_quantizer=xq, weight_quantizer=wq)
    with torch.no_grad(), api.calibrating(layer):
        layer(x)
    switch_to_evaluation(layer)
    return layer, x


def _reference(layer: QuantLinear, x: torch.Tensor) -> np.ndarray:
    """float64 / int64 re-derivation: per input channel its (scale, zero point), codes by rounding x / s
    half to even, the integer product of the centred codes, scaled by input and weight scales."""
    xq, wq = layer.input_quantizer, layer.weight_quantizer
    s, z = (t.detach().double().numpy() for t in xq.channel_params())
    s, z = np.broadcast_to(s, (64,)), np.broadcast_to(z, (64,))
    xs = x.double().numpy()
    codes = np.clip(np.round(xs / s.astype(np.float32).astype(np.float64)) + z, xq.qmin, xq.qmax)
    w_codes = wq.quantize_int(layer.weight.detach()).numpy().astype(np.int64)  # [out, in]
    ws, wz = (t.detach().double().numpy().reshape(-1) for t in wq.channel_params())
    centred = (codes - z).astype(np.int64)
    out = np.zeros((*xs.shape[:-1], w_codes.shape[0]))
    for k in np.unique(s):  # one integer sub-product per input grid
        cols = s == k
        out += (centred[..., cols] @ (w_codes[:, cols] - wz[:, None].astype(np.int64)).T) * k
    return out * ws + layer.bias.detach().double().numpy()


@pytest.mark.parametrize(("cag", "a_bits"), [(False, 8), (True, 8), (False, 4)])
def test_integer_linear_is_the_integer_product_of_the_codes(cag, a_bits, tmp_path):
    layer, x = _layer(cag, a_bits)
    path = _export(onnx_ready(nn.Sequential(layer)), (x,), tmp_path / "lin.onnx", ["x"], ["y"], {})
    ops = graph_ops(path)
    grids = int(layer.input_quantizer.groups) if cag else 1
    assert ops["MatMulIntegerToFloat"] == ops["QuantizeLinear"] == grids
    clips = [n.op_type for n in onnx.load(str(path)).graph.node].count("Clip")
    assert clips == (grids if a_bits < 8 else 0)  # a 4-bit grid is clipped to [0, 15] in its uint8 container
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    expected = _reference(layer, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with torch.no_grad():
        fake = layer(x).double().numpy()
    np.testing.assert_allclose(fake, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("cag", [False, True])
def test_standard_ops_export_is_plain_onnx_with_the_same_product(cag, tmp_path):
    layer, x = _layer(cag, 8)
    path = _export(onnx_ready(nn.Sequential(layer), runtime_ops=False), (x,), tmp_path / "std.onnx", ["x"],
                   ["y"], {})
    nodes = onnx.load(str(path)).graph.node
    assert all(n.domain in ("", "ai.onnx") for n in nodes)
    assert graph_ops(path)["MatMulInteger"] == (int(layer.input_quantizer.groups) if cag else 1)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    expected = _reference(layer, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _run_both(sam, inputs, files):
    image = sam.preprocess(inputs[0]["image"][None])
    boxes = inputs[0]["boxes"]
    with torch.no_grad():
        def decode():
            embedding = sam.image_encoder(image)
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        fake = decode()
        with running_in_onnxruntime(sam, files, threads=1):
            runtime = decode()
    return fake, runtime


@pytest.mark.parametrize("preset", ["exp/deploy/w8a8.yaml", "exp/deploy/w4a8.yaml",
                                    "exp/deploy/cag_w4a8.yaml", "exp/minmax/w4a4.yaml"])
def test_onnxruntime_masks_agree_with_the_fake_quant_model(preset, tmp_path):
    sam, _, inputs = _quantized(preset)
    files = export_onnx(sam, tmp_path, quant_encoder=True)
    assert set(files) == {"image_encoder", "mask_decoder"} and not list(tmp_path.glob(".*.tmp"))
    for path in files.values():
        ops = graph_ops(path)
        assert ops["MatMulIntegerToFloat"] > 0 and ops["QuantizeLinear"] >= ops["MatMulIntegerToFloat"]
        assert ops["DequantizeLinear"] > 0  # the attention operands and the neck's conv weights
    (fake_masks, fake_iou), (masks, iou) = _run_both(sam, inputs, files)
    assert masks.shape == fake_masks.shape
    assert ((masks > 0) == (fake_masks > 0)).float().mean() >= 0.99
    assert (masks - fake_masks).abs().max() <= 0.05 * fake_masks.abs().max()
    assert torch.allclose(iou, fake_iou, atol=0.05)


def test_recipes_with_no_standard_form_are_refused_by_name():
    sam, _, _ = _quantized("exp/ahcptq/w4a4.yaml")
    with pytest.raises(OnnxExportError, match=r"HLUQ.*exp/deploy/w8a8.yaml") as err:
        onnx_ready(sam.image_encoder)
    assert "AGQ" in str(err.value) and "lin2.input_quantizer" in str(err.value)
    assert all((REPO / recipe).is_file() for recipe in EXPORTABLE_RECIPES)  # the recipes it suggests exist


def test_an_uncalibrated_model_is_refused(tmp_path):
    from test_sam_quantize import tiny_sam

    sam = tiny_sam()
    quantize_sam(sam, load_qconfig(REPO / "exp/deploy/w8a8.yaml"), quant_encoder=True)
    with pytest.raises(OnnxExportError, match="not calibrated"):
        export_onnx(sam, tmp_path, quant_encoder=True)
    assert not list(tmp_path.iterdir())


def test_a_packed_file_exports_to_the_same_graphs(tmp_path, capsys):
    sam, qconfig, inputs = _quantized("exp/deploy/cag_w4a8.yaml")
    pack_model(sam, qconfig, True, tmp_path / "model.npz")
    assert deploy_cli(["onnx", str(tmp_path / "model.npz"), "--out", str(tmp_path / "onnx")]) == 0
    assert "mask_decoder.onnx" in capsys.readouterr().out
    live = export_onnx(sam, tmp_path / "live", quant_encoder=True)
    image = sam.preprocess(inputs[0]["image"][None]).numpy()
    outputs = [ort.InferenceSession(str(folder / "image_encoder.onnx")).run(None, {"image": image})[0]
               for folder in (tmp_path / "onnx", live["image_encoder"].parent)]
    assert np.array_equal(*outputs)
    (tmp_path / "bad.npz").write_bytes(b"not a packed file")
    assert deploy_cli(["onnx", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "x")]) == 1
    assert "bad.npz" in capsys.readouterr().err
