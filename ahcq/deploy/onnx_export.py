"""The quantized image encoder and mask decoder as ONNX graphs that a stock runtime (ONNX Runtime) runs.

Every quantizer on a uniform grid becomes standard ONNX: an activation site is QuantizeLinear (then Clip to
the grid's range when it has fewer than 8 bits) followed by DequantizeLinear (QDQ), per tensor or per axis;
a weight is its integer codes as an int8 initializer and a DequantizeLinear. A ``QuantLinear`` whose
input and weight grids both fit 8-bit containers is emitted in integer form instead: QuantizeLinear of the
input, then ONNX Runtime's ``com.microsoft`` ``MatMulIntegerToFloat`` with the weight codes (stored [in,
out], per-output-channel zero points): the integer product, scaled by (input scale x weight scale) and the
bias added in the GEMM's output stage. The runtime's integer GEMM does the work, which is where the speed
comes from (a QDQ MatMul without a quantized output is not fused by ONNX Runtime's CPU provider, nor is
MatMulInteger -> Cast -> Mul with constant scales, whose float passes over every output made the SAM-B
decoder slower than FP32). ``runtime_ops=False`` keeps to standard ONNX for other runtimes. A CAG input
(AHCPTQ's channel groups) is exported as the hardware does it: the input channels reordered by group, G
per-tensor quantizations, G integer sub-products with the matching weight rows, summed.

Quantizers with no standard ONNX form are refused by name: HLUQ (two uniform pieces joined by a log
piece), LNQ and AGQ (log-domain probability codes). 4-bit weights travel in 8-bit containers (their codes
and zero points are exact; only the file is larger than the packed one).

The exported graph computes what the fake-quant model computes up to float32 summation order (and the
fused multiply-add of the GEMM's output stage) and one rounding detail: QuantizeLinear divides by the scale
where the fake quant multiplies by its float32 reciprocal, so a value within an ulp of a rounding tie may
take the neighbouring code.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import Mode, Quantizer, Role
from ahcq.quantization.quantizers.cag import CAGQuantizer
from ahcq.quantization.quantizers.grid import GridQuantizer

__all__ = ["DECODER_INPUTS", "EXPORTABLE_RECIPES", "OPSET", "OnnxExportError", "QuantGrid",
           "check_exportable", "export_onnx", "onnx_ready"]

OPSET = 17
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulIntegerToFloat)
EXPORTABLE_RECIPES = ("exp/deploy/w8a8.yaml", "exp/deploy/w4a8.yaml", "exp/deploy/cag_w4a8.yaml")
_NO_STANDARD_FORM = {"hluq": "HLUQ", "lnq": "LNQ", "agq": "AGQ"}


class OnnxExportError(ValueError):
    """The model holds a quantizer that standard ONNX operators cannot express."""


@dataclass(frozen=True)
class QuantGrid:
    """One uniform grid in an 8-bit container: float32 scale, zero point and code range as the container
    holds them (shifted by ``offset`` from the quantizer's), per tensor (0-D) or along ``axis`` (1-D).

    Shifting codes and zero point by the same 128 leaves ``code - zero_point``, so every product and
    dequantized value, unchanged; it lets activations always travel as uint8 and weights as int8, the pair
    ONNX Runtime's integer GEMM runs fast: a 4096 x 768 x 3072 MatMulInteger on one AVX-512 VNNI core took
    20 ms as u8 x s8 and 123 ms as u8 x u8, against 144 ms for the FP32 MatMul."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None
    dtype: torch.dtype
    offset: int = 0

    def _shaped(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return p
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return p.view(shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear's codes (as float): ``clamp(round(x / scale) + zero_point, qmin, qmax)``."""
        q = torch.round(x / self._shaped(self.scale, x)) + self._shaped(self.zero_point.float(), x)
        return q.clamp(self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self._shaped(self.zero_point.float(), codes)) * self._shaped(self.scale, codes)

    def emit_quantize(self, g: torch.Graph, x: torch.Value) -> torch.Value:
        """QuantizeLinear, and a Clip to [qmin, qmax] when the grid is narrower than its container."""
        zp = self.zero_point.to(self.dtype)
        q = g.op("QuantizeLinear", x, _const(g, self.scale), _const(g, zp), **self._axis())
        info = torch.iinfo(self.dtype)
        if (self.qmin, self.qmax) != (info.min, info.max):
            q = g.op("Clip", q, _const(g, torch.tensor(self.qmin, dtype=self.dtype)),
                     _const(g, torch.tensor(self.qmax, dtype=self.dtype)))
        return q

    def emit_dequantize(self, g: torch.Graph, codes: torch.Value) -> torch.Value:
        zp = self.zero_point.to(self.dtype)
        return g.op("DequantizeLinear", codes, _const(g, self.scale), _const(g, zp), **self._axis())

    def _axis(self) -> dict[str, int]:
        return {} if self.axis is None or self.scale.dim() == 0 else {"axis_i": self.axis}


def _const(g: torch.Graph, t: torch.Tensor) -> torch.Value:
    return g.op("Constant", value_t=t.detach().cpu().contiguous())


def _family(q: Quantizer) -> str:
    return getattr(q, "family", type(q).__name__)


def container(qmin: int, qmax: int, dtype: torch.dtype, name: str) -> int:
    """The shift that puts codes of [qmin, qmax] into ``dtype`` (uint8 or int8): 0 or +-128."""
    info = torch.iinfo(dtype)
    for offset in (0, 128 if dtype == torch.uint8 else -128):
        if info.min <= qmin + offset and qmax + offset <= info.max:
            return offset
    raise OnnxExportError(f"quantizer {name!r}: a grid [{qmin}, {qmax}] does not fit an 8-bit ONNX container")


def make_grid(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None,
              dtype: torch.dtype, name: str) -> QuantGrid:
    """A ``QuantGrid`` of the quantizer grid (scale, zero point, [qmin, qmax]) shifted into ``dtype``."""
    offset = container(qmin, qmax, dtype, name)
    scale = scale.detach().float().cpu()
    zero_point = zero_point.detach().cpu().to(torch.int32) + offset
    if scale.numel() == 1:
        scale, zero_point, axis = scale.reshape(()), zero_point.reshape(()), None
    return QuantGrid(scale, zero_point, qmin + offset, qmax + offset, axis, dtype, offset)


def grid_of(q: GridQuantizer, ndim: int | None = None, dtype: torch.dtype = torch.uint8) -> QuantGrid:
    """The grid a calibrated uniform quantizer uses (CAG's groups expanded per channel) in an 8-bit
    container: uint8 for activations, int8 for weights."""
    scale, zero_point = q.channel_params()
    axis = q.ch_axis
    if axis is not None and ndim is not None and axis < 0:
        axis += ndim
    return make_grid(scale, zero_point, q.qmin, q.qmax, axis, dtype, q.name)


def check_exportable(module: nn.Module) -> None:
    """Raise naming every quantizer of ``module`` (in any mode, so a recipe is refused before it is
    calibrated) with no standard ONNX form."""
    bad = [f"{name} ({_NO_STANDARD_FORM[_family(q)]})" for name, q in module.named_modules()
           if isinstance(q, Quantizer) and _family(q) in _NO_STANDARD_FORM]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise OnnxExportError(
            f"cannot export to ONNX: {shown} have no standard QuantizeLinear/DequantizeLinear form; recipes "
            f"on uniform and CAG grids export ({', '.join(EXPORTABLE_RECIPES)}, or minmax / BRECQ / QDrop "
            "recipes)")
    other = [name for name, q in module.named_modules() if isinstance(q, Quantizer)
             and not isinstance(q, GridQuantizer)]
    if other:
        raise OnnxExportError(f"cannot export to ONNX: quantizers {', '.join(other[:4])} are not on a "
                              "uniform grid")


def _refuse_non_uniform(module: nn.Module) -> None:
    """Raise naming every quantizer ONNX cannot express or that is not calibrated and quantizing."""
    check_exportable(module)
    live = [name for name, q in module.named_modules() if isinstance(q, Quantizer)
            and (not bool(q.calibrated) or q.mode not in (Mode.OFF, Mode.QUANTIZE))]
    if live:
        raise OnnxExportError(f"cannot export to ONNX: quantizers {', '.join(live[:4])} are not calibrated "
                              "and quantizing (calibrate the model and switch it to evaluation first)")


def _op(forward: Callable[[torch.Tensor], torch.Tensor],
        symbolic: Callable[[torch.Graph, torch.Value], torch.Value]) -> type[torch.autograd.Function]:
    """A one-input autograd Function: ``forward`` in torch, ``symbolic`` in the ONNX graph. A class per site,
    so that the site's constants live in closures, not in arguments the exporter would have to trace."""
    return type("AhcqOnnxOp", (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, x: forward(x)),
        "symbolic": staticmethod(symbolic),
    })


class QDQ(nn.Module):
    """An activation quantizer slot as QuantizeLinear -> DequantizeLinear."""

    def __init__(self, grid: QuantGrid) -> None:
        super().__init__()
        self.grid = grid
        self._fn = _op(lambda x: grid.dequantize(grid.codes(x)),
                       lambda g, x: grid.emit_dequantize(g, grid.emit_quantize(g, x)))

    def forward(self, x: torch.Tensor, **ctx: object) -> torch.Tensor:
        return self._fn.apply(x)


class WeightCodes(nn.Module):
    """A weight quantizer slot as its codes (an 8-bit initializer) and a DequantizeLinear; ignores the float
    weight it is handed, which therefore does not reach the graph."""

    def __init__(self, quantizer: GridQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.grid = grid_of(quantizer, weight.dim(), torch.int8)
        codes = quantizer.quantize_int(weight.detach()) + self.grid.offset
        if not torch.equal(self.grid.dequantize(codes.float()), quantizer(weight.detach()).detach()):
            raise OnnxExportError(f"quantizer {quantizer.name!r}: its codes do not decode to its fake-quant "
                                  "weight")
        self.register_buffer("codes", codes.to(self.grid.dtype))
        grid = self.grid
        self._fn = _op(lambda c: grid.dequantize(c.float()), lambda g, c: grid.emit_dequantize(g, c))

    def forward(self, w: torch.Tensor, **ctx: object) -> torch.Tensor:
        return self._fn.apply(self.codes)


@dataclass(frozen=True)
class _Group:
    """One input grid of an integer linear: the input channels it covers and the weight rows they meet."""

    channels: torch.Tensor
    grid: QuantGrid
    weight_codes: torch.Tensor  # [len(channels), out] in the weight grid's container


class IntLinear(nn.Module):
    """``QuantLinear`` in integer form: per input group, quantize, the integer product with the weight codes
    scaled to float (and the bias, with one group) in one ``MatMulIntegerToFloat``; several groups are summed,
    then the bias added (and the output quantizer's QDQ, if any)."""

    def __init__(self, layer: QuantLinear, runtime_ops: bool = True) -> None:
        super().__init__()
        self.runtime_ops = runtime_ops
        xq, wq = layer.input_quantizer, layer.weight_quantizer
        w_grid = grid_of(wq, 2, torch.int8)
        if w_grid.axis not in (None, 0):
            raise OnnxExportError(f"quantizer {wq.name!r}: integer linear needs per-output-channel weights")
        codes = (wq.quantize_int(layer.weight.detach()) + w_grid.offset).t().contiguous()  # [in, out]
        self.w_scale = w_grid.scale
        self.w_zero = w_grid.zero_point
        self.groups = self._groups(xq, codes.to(w_grid.dtype))
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        out_q = layer.output_quantizer
        self.output = None if out_q is None or out_q.mode is Mode.OFF else QDQ(grid_of(out_q))
        self._fn = _op(self._reference, self._emit)

    @staticmethod
    def _groups(xq: GridQuantizer, codes: torch.Tensor) -> list[_Group]:
        if isinstance(xq, CAGQuantizer):
            used = int(xq.groups)
            scales = xq.effective_scale().detach().float().cpu()[:used]
            zps = xq.zero_point.detach().cpu()[:used]
            index = xq.group_index.detach().cpu()
            groups = []
            for k in range(used):
                channels = torch.nonzero(index == k).flatten()
                if channels.numel():
                    grid = make_grid(scales[k], zps[k], xq.qmin, xq.qmax, None, torch.uint8, xq.name)
                    groups.append(_Group(channels, grid, codes[channels]))
            return groups
        grid = grid_of(xq)
        if grid.axis is not None:
            raise OnnxExportError(f"quantizer {xq.name!r}: integer linear needs a per-tensor or CAG input "
                                  "grid")
        return [_Group(torch.arange(codes.shape[0]), grid, codes)]

    def _w_zero_row(self) -> torch.Tensor:
        """The weight zero points broadcast over the [in, out] codes."""
        return self.w_zero.float() if self.w_zero.dim() == 0 else self.w_zero.float()[None, :]

    def _scale(self, grp: _Group) -> torch.Tensor:
        """One factor per output channel: the group's input scale times the weight scale, in float32 (as
        ``MatMulIntegerToFloat`` forms it)."""
        return (grp.grid.scale * self.w_scale).float()

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for grp in self.groups:
            xs = x.index_select(-1, grp.channels)
            acc = torch.matmul(grp.grid.codes(xs) - grp.grid.zero_point.float(),
                               grp.weight_codes.float() - self._w_zero_row()) * self._scale(grp)
            total = acc if total is None else total + acc
        return total if self.bias is None else total + self.bias

    def _emit(self, g: torch.Graph, x: torch.Value) -> torch.Value:
        w_zp = _const(g, self.w_zero.to(self.groups[0].weight_codes.dtype))
        fuse_bias = self.runtime_ops and self.bias is not None and len(self.groups) == 1
        total = None
        for grp in self.groups:
            xs = x if len(self.groups) == 1 else g.op("Gather", x, _const(g, grp.channels), axis_i=-1)
            q, codes = grp.grid.emit_quantize(g, xs), _const(g, grp.weight_codes)
            x_zp = _const(g, grp.grid.zero_point.to(grp.grid.dtype))
            if self.runtime_ops:
                bias = [_const(g, self.bias)] if fuse_bias else []
                acc = g.op(f"{MS_DOMAIN}::MatMulIntegerToFloat", q, codes, _const(g, grp.grid.scale),
                           _const(g, self.w_scale), x_zp, w_zp, *bias)
            else:
                acc = g.op("Mul", g.op("Cast", g.op("MatMulInteger", q, codes, x_zp, w_zp), to_i=1),
                           _const(g, self._scale(grp)))  # to_i=1: FLOAT
            total = acc if total is None else g.op("Add", total, acc)
        return total if self.bias is None or fuse_bias else g.op("Add", total, _const(g, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fn.apply(x)
        return y if self.output is None else self.output(y)


def _integer_ready(layer: QuantLinear) -> bool:
    xq, wq = layer.input_quantizer, layer.weight_quantizer
    return (isinstance(xq, GridQuantizer) and isinstance(wq, GridQuantizer)
            and xq.mode is Mode.QUANTIZE and wq.mode is Mode.QUANTIZE
            and (isinstance(xq, CAGQuantizer) or xq.ch_axis is None) and wq.ch_axis in (None, 0))


def _set_child(root: nn.Module, name: str, value: nn.Module | None) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = value


def onnx_ready(module: nn.Module, integer_linear: bool = True, runtime_ops: bool = True) -> nn.Module:
    """A copy of ``module`` (a quantized image encoder or mask decoder) whose quantizer slots are in their
    ONNX form: QDQ for activations, codes + DequantizeLinear for weights, ``IntLinear`` for a QuantLinear
    with uniform 8-bit-container grids on both sides (when ``integer_linear``: ONNX Runtime's fused
    ``MatMulIntegerToFloat``, or with ``runtime_ops=False`` standard ONNX only, ``MatMulInteger`` -> Cast
    -> Mul, for other runtimes); a switched-off quantizer becomes the empty slot. Runs in torch too (it is
    how the export is traced), computing the exported graph's arithmetic."""
    _refuse_non_uniform(module)
    ready = copy.deepcopy(module).eval()
    if integer_linear:
        for name, layer in list(ready.named_modules()):
            if isinstance(layer, QuantLinear) and _integer_ready(layer):
                _set_child(ready, name, IntLinear(layer, runtime_ops))
    for name, q in list(ready.named_modules()):
        if not isinstance(q, Quantizer):
            continue
        if q.mode is Mode.OFF:
            _set_child(ready, name, None)
        elif q.role is Role.WEIGHT:
            owner = ready.get_submodule(name.rpartition(".")[0])
            _set_child(ready, name, WeightCodes(q, owner.weight))
        else:
            _set_child(ready, name, QDQ(grid_of(q)))
    return ready


class _DecoderGraph(nn.Module):
    """The mask decoder with its box-prompt call fixed (one mask per prompt), as ``sam_runner`` calls it."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(image_embeddings=image_embeddings, image_pe=image_pe,
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=False)


DECODER_INPUTS = ("image_embeddings", "image_pe", "sparse_prompt_embeddings", "dense_prompt_embeddings")


def export_onnx(sam: nn.Module, out_dir: Path, quant_encoder: bool, integer_linear: bool = True,
                runtime_ops: bool = True) -> dict[str, Path]:
    """Write ``mask_decoder.onnx`` (and ``image_encoder.onnx`` when the encoder is quantized) of a quantized
    SAM into ``out_dir``; returns the files by part. Each is written beside its final name and renamed, so
    a failed export leaves no half-written graph."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    size = sam.image_encoder.img_size
    with torch.no_grad():
        embedding = sam.image_encoder(torch.zeros(1, 3, size, size)) if quant_encoder else None
    if quant_encoder:
        encoder = onnx_ready(sam.image_encoder, integer_linear, runtime_ops)
        files["image_encoder"] = _export(encoder, (torch.zeros(1, 3, size, size),),
                                         out_dir / "image_encoder.onnx", ["image"], ["image_embeddings"], {})
    if embedding is None:
        c = sam.prompt_encoder.embed_dim
        h, w = sam.prompt_encoder.image_embedding_size
        embedding = torch.zeros(1, c, h, w)
    pe = sam.prompt_encoder.get_dense_pe()
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    decoder = _DecoderGraph(onnx_ready(sam.mask_decoder, integer_linear, runtime_ops))
    files["mask_decoder"] = _export(decoder, (embedding, pe, sparse.detach(), dense.detach()),
                                    out_dir / "mask_decoder.onnx", list(DECODER_INPUTS),
                                    ["low_res_masks", "iou_predictions"],
                                    {name: {0: "boxes"} for name in (*DECODER_INPUTS[2:], "low_res_masks",
                                                                     "iou_predictions")})
    return files


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], dynamic: dict[str, dict[int, str]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            # traced at the model's fixed input size: the size-dependent Python branches the tracer warns
            # about are constants there; the TorchScript exporter (deprecated for the dynamo one) is the
            # one that honours the autograd Functions' ``symbolic`` the QDQ and integer forms rely on
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True, custom_opsets={MS_DOMAIN: 1})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
