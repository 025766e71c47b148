"""The quantized SAM as one packed file: integer weight codes at their bit width, the rest as stored floats.

Layout (a compressed ``.npz``, format ``ahcq-packed``, version 2): an array ``manifest`` (the UTF-8 bytes of
a JSON object) and one flat array per dtype, ``blob_<dtype>`` (``blob_uint8`` holds the packed codes), so
that a thousand small tensors cost no per-entry overhead. A reference ``{"blob", "offset", "count", "shape"}``
names a slice of a blob; a float32 array whose every value is a float16 value is stored in ``blob_float16``
and its reference adds ``"dtype": "float32"`` (lossless: it reads back bit for bit; the config key
``float16_weights`` makes every float layer such an array).

The manifest holds ``format``, ``version``, ``sha256`` (of the blobs' bytes in name order), ``spec`` (the
``SamSpec`` that rebuilds the architecture), ``qconfig`` (``QConfig.to_dict()``), ``quant_encoder``,
``weights`` (per quantized layer: ``name``, ``shape``, ``bits``, ``qmin``, ``qmax``, ``symmetric``,
``ch_axis`` and references to its packed codes (``ahcq.deploy.codes``), float32 scales and int32 zero points
per output channel) and ``tensors`` (every other state-dict entry: ``name`` and a reference to its values).

A quantized layer's float weight and its weight quantizer's state (AdaRound's rounding logits among them)
are not stored, nor the buffers only calibration reads (``Quantizer.calibration_state``): the codes and
their grid replace them. ``unpack_model`` rebuilds the fake-quant model with a fixed uniform quantizer on
each weight holding the decoded codes; ``pack_model`` checks before writing that this reproduces every
fake-quant weight bit for bit, so the unpacked model's masks are the packed run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn

from ahcq.deploy.codes import pack_codes, unpack_codes
from ahcq.models.sam_checkpoint import SamSpec, sam_from_spec, spec_of_sam
from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization import api
from ahcq.quantization.config import MixedConfig, QConfig, parse_qconfig
from ahcq.quantization.mixed import Allocation, Budget, SiteKind
from ahcq.quantization.quantizers import FixedQuantizer, Mode, Role
from ahcq.quantization.quantizers.grid import GridQuantizer

__all__ = ["FORMAT", "VERSION", "PackedFormatError", "pack_model", "read_packed", "take", "unpack_model"]

FORMAT, VERSION = "ahcq-packed", 2
_MANIFEST_KEYS = ("sha256", "spec", "qconfig", "allocation", "quant_encoder", "weights", "tensors")


class PackedFormatError(ValueError):
    """A packed file that is not one, is damaged, or was written by another format version."""


def _fixed(bits: int, symmetric: bool, ch_axis: int | None, scale: torch.Tensor, zero_point: torch.Tensor,
           name: str) -> FixedQuantizer:
    """A calibrated fixed uniform weight quantizer on the given grid, in QUANTIZE mode."""
    q = FixedQuantizer(Role.WEIGHT, bits, symmetric=symmetric, ch_axis=ch_axis, name=name)
    q.set_grid(scale, zero_point)
    q.calibrated.fill_(True)
    q.set_mode(Mode.QUANTIZE)
    return q


def _weight_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if getattr(module, "weight_quantizer", None) is not None:
            yield name, module


class _Writer:
    """Appends arrays to one flat blob per dtype and hands out references to their slices."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, array: np.ndarray) -> dict[str, Any]:
        array = np.ascontiguousarray(array)
        stored, extra = array, {}
        if array.dtype == np.float32 and array.size:
            half = array.astype(np.float16)
            if np.array_equal(half.astype(np.float32), array, equal_nan=True):
                stored, extra = half, {"dtype": "float32"}
        blob = f"blob_{stored.dtype.name}"
        offset = self.sizes.get(blob, 0)
        self.parts.setdefault(blob, []).append(stored.reshape(-1))
        self.sizes[blob] = offset + stored.size
        return {"blob": blob, "offset": offset, "count": int(stored.size), "shape": list(stored.shape),
                **extra}

    def blobs(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in sorted(self.parts.items())}


def _digest(blobs: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(blobs[name]).tobytes())
    return digest.hexdigest()


def take(blobs: dict[str, np.ndarray], ref: dict[str, Any]) -> np.ndarray:
    """The array a manifest reference names."""
    values = blobs[ref["blob"]][ref["offset"]:ref["offset"] + ref["count"]]
    if values.size != ref["count"]:
        raise PackedFormatError(f"reference past the end of {ref['blob']}")
    if "dtype" in ref:
        values = values.astype(ref["dtype"])
    return values.reshape(ref["shape"])


def _pack_weight(name: str, module: nn.Module, writer: _Writer) -> dict[str, Any]:
    wq = module.weight_quantizer
    if not isinstance(wq, GridQuantizer):
        raise PackedFormatError(f"{name}: weight quantizer family {wq.family!r} has no packed form "
                                "(uniform-grid weight quantizers only)")
    with torch.no_grad():
        codes = wq.quantize_int(module.weight)
        scale, zero_point = (t.detach().clone() for t in wq.channel_params())
        fixed = _fixed(wq.bits, wq.symmetric, wq.ch_axis, scale, zero_point, wq.name)
        if (fixed.qmin, fixed.qmax) != (wq.qmin, wq.qmax) or not torch.equal(
                fixed(fixed.dequantize_int(codes)), wq(module.weight)):
            raise PackedFormatError(f"{name}: the decoded codes do not reproduce the fake-quant weight")
    return {
        "name": name, "shape": list(codes.shape), "bits": wq.bits, "qmin": wq.qmin, "qmax": wq.qmax,
        "symmetric": wq.symmetric, "ch_axis": wq.ch_axis,
        "codes": writer.add(pack_codes(codes.cpu().numpy(), wq.bits, wq.qmin)),
        "scale": writer.add(scale.cpu().float().numpy().reshape(-1)),
        "zero_point": writer.add(zero_point.cpu().numpy().astype(np.int32).reshape(-1)),
    }


def _allocation_record(allocation: Allocation | None) -> dict[str, Any] | None:
    """A mixed-precision allocation in full (its sites' kinds too), so unpacking needs no sensitivity file."""
    if allocation is None:
        return None
    return {"sites": [[site, kind.value, bits] for site, kind, bits in allocation.sites],
            "average_bits": allocation.average_bits, "bops_bits": allocation.bops_bits,
            "error": allocation.error}


def _qconfig(manifest: dict[str, Any], source: str) -> QConfig:
    """The packed run's config, its ``mixed`` section and allocation as recorded (not re-solved from the
    sensitivity file, which need not travel with the packed file)."""
    data = dict(manifest["qconfig"])
    mixed = data.pop("mixed", None) or {}
    qconfig = parse_qconfig(data, source=source)
    record = manifest.get("allocation")
    allocation = None if record is None else Allocation(
        tuple((site, SiteKind(kind), bits) for site, kind, bits in record["sites"]), record["average_bits"],
        record["bops_bits"], record["error"])
    fields = {**mixed, "bits": tuple(mixed.get("bits", ())), "allocation": allocation}
    if "budget" in fields:
        fields["budget"] = Budget(fields["budget"])
    return dataclasses.replace(qconfig, mixed=MixedConfig(**fields))


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_model(sam: Sam, qconfig: QConfig, quant_encoder: bool, path: str | os.PathLike) -> dict[str, int]:
    """Write the calibrated, fully quantized ``sam`` to ``path``; returns its size and the float32 size of
    ``sam``'s parameters and buffers (``bytes``, ``fp32_bytes``)."""
    api.assert_fully_quantized(sam)
    writer = _Writer()
    weights = [_pack_weight(name, module, writer) for name, module in _weight_layers(sam)]
    skipped = {f"{w['name']}.weight" for w in weights}
    prefixes = tuple(f"{w['name']}.weight_quantizer." for w in weights)
    for name, q in api.iter_quantizers(sam):
        skipped |= {f"{name}.{buffer}" for buffer in q.calibration_state}
    tensors = [{"name": key, "array": writer.add(value.detach().cpu().numpy())}
               for key, value in sam.state_dict().items()
               if key not in skipped and not key.startswith(prefixes)]
    spec = spec_of_sam(sam)
    blobs = writer.blobs()
    manifest = {"format": FORMAT, "version": VERSION, "sha256": _digest(blobs),
                "spec": {**vars(spec), "global_attn_indexes": list(spec.global_attn_indexes)},
                "qconfig": qconfig.to_dict(), "allocation": _allocation_record(qconfig.mixed.allocation),
                "quant_encoder": quant_encoder, "weights": weights,
                "tensors": tensors}
    blob = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    path = Path(path)
    _write_atomic(path, {"manifest": blob, **blobs})
    fp32 = sum(4 * t.numel() for t in [*sam.parameters(), *sam.buffers()] if t.is_floating_point())
    return {"bytes": path.stat().st_size, "fp32_bytes": fp32}


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and arrays of a packed file, after checking its format, version and checksum."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise PackedFormatError(f"{path}: no such packed file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PackedFormatError(f"{path}: not a readable packed file (truncated or damaged?): {err}") \
            from None
    try:
        manifest = json.loads(arrays.pop("manifest").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise PackedFormatError(f"{path}: no readable manifest; not an {FORMAT} file") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackedFormatError(f"{path}: not an {FORMAT} file")
    if manifest.get("version") != VERSION:
        raise PackedFormatError(f"{path}: {FORMAT} version {manifest.get('version')!r}; this ahcq reads "
                                f"version {VERSION}")
    absent = [key for key in _MANIFEST_KEYS if key not in manifest]
    if absent:
        raise PackedFormatError(f"{path}: manifest lacks {absent}; not a complete {FORMAT} file")
    if _digest(arrays) != manifest["sha256"]:
        raise PackedFormatError(f"{path}: checksum mismatch; the file is damaged")
    return manifest, arrays


def unpack_model(path: str | os.PathLike) -> tuple[Sam, QConfig, bool]:
    """The fake-quant model of a packed file (every quantizer on), its config and ``quant_encoder``."""
    manifest, arrays = read_packed(path)
    fields = manifest["spec"]
    spec = SamSpec(**{**fields, "global_attn_indexes": tuple(fields["global_attn_indexes"])})
    qconfig = _qconfig(manifest, str(path))
    sam = quantize_sam(sam_from_spec(spec), qconfig, manifest["quant_encoder"])
    restored = set()
    for w in manifest["weights"]:
        module = sam.get_submodule(w["name"])
        count = int(np.prod(w["shape"]))
        codes = unpack_codes(take(arrays, w["codes"]), w["bits"], w["qmin"], count).reshape(w["shape"])
        fixed = _fixed(w["bits"], w["symmetric"], w["ch_axis"], torch.from_numpy(take(arrays, w["scale"])),
                       torch.from_numpy(take(arrays, w["zero_point"])), module.weight_quantizer.name)
        module.weight_quantizer = fixed
        with torch.no_grad():
            module.weight.copy_(fixed.dequantize_int(torch.from_numpy(codes)))
        restored |= {f"{w['name']}.weight"}
        restored |= {f"{w['name']}.weight_quantizer.{k}" for k in fixed.state_dict()}
    state = {t["name"]: torch.from_numpy(np.array(take(arrays, t["array"]))) for t in manifest["tensors"]}
    result = sam.load_state_dict(state, strict=False)
    calibration_only = {f"{name}.{b}" for name, q in api.iter_quantizers(sam) for b in q.calibration_state}
    missing = set(result.missing_keys) - restored - calibration_only
    if result.unexpected_keys or missing:
        raise PackedFormatError(f"{path}: does not fit the model it describes (missing "
                                f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})")
    api.set_mode(sam, Mode.QUANTIZE)
    return sam, qconfig, manifest["quant_encoder"]
