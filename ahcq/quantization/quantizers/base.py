"""Role, Mode and the ``Quantizer`` base class shared by every quantizer family.

A quantizer is an ``nn.Module`` whose behaviour is selected by an explicit ``Mode`` (never by module-name
substrings): ``OFF`` passes through, ``CALIBRATE`` observes statistics and passes through, ``QUANTIZE``
fake-quantizes, ``DROP`` mixes float and fake-quantized elements (QDrop). Leaving ``CALIBRATE`` calls
``finalize()`` once, which turns the statistics into quantization parameters. QDrop has one path: every
family's ``fake_quant(x, keep)`` leaves the elements of ``keep`` float (values and gradients), fused into its
own fake-quant where it can.

Parameters whose shape is only known after calibration (per-channel scales, AdaRound logits) are created at
construction and resized in place through ``.data``, so an optimizer built before calibration keeps valid
references; ``_load_from_state_dict`` resizes them to the stored shape for the same reason.
"""
from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..granularity import Granularity, PerTensor
from ..primitives import NonFiniteInputError, checking_finite

__all__ = ["Mode", "Quantizer", "Role", "keep_mask"]

_KEEP_LEVELS = 1 << 16  # QDrop probabilities are resolved to multiples of 1/65536
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """QDrop: a boolean mask of ``shape``, each element ``True`` with probability ``p`` (to ``2**-16``),
    from ``generator`` (on its device; the default generator when ``None``), returned on ``device``.

    Drawn as 64-bit words: at ``p = 1/2`` (QDrop's usual setting) each element is one random bit, otherwise
    each compares a 16-bit integer with ``round(p * 2**16)``; a word thus serves 64 or 4 elements, where
    ``torch.rand(shape) < p`` spends a generator call on each. ``p = 0`` and ``p = 1`` draw nothing.
    """
    level = round(p * _KEEP_LEVELS)
    if level <= 0 or level >= _KEEP_LEVELS:
        return torch.full(tuple(shape), level > 0, dtype=torch.bool, device=device)
    count = math.prod(shape)
    per_word = 64 if level == _KEEP_LEVELS // 2 else 4
    source = generator.device if generator is not None else device
    words = torch.empty(-(-count // per_word), dtype=torch.int64, device=source)
    words.random_(-(1 << 63), None, generator=generator)
    if per_word == 64:
        bits = words.view(torch.uint8).unsqueeze(1) >> _BIT_SHIFTS.to(words.device)
        keep = bits.bitwise_and_(1).view(-1)[:count].view(torch.bool)
    else:
        keep = torch.lt(words.view(torch.int16)[:count], level - _KEEP_LEVELS // 2)
    return keep.view(tuple(shape)).to(device)


class Role(enum.Enum):
    """What a quantizer quantizes; decides nothing by itself but is recorded for maps and exports."""

    WEIGHT = "weight"
    INPUT = "input"
    QUERY = "query"
    KEY = "key"
    VALUE = "value"
    ATTN_PROB = "attn_prob"
    OUTPUT = "output"


class Mode(enum.Enum):
    """Forward behaviour of a quantizer."""

    OFF = "off"
    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"
    DROP = "drop"


class Quantizer(nn.Module):
    """Base of every quantizer family.

    Subclasses implement ``observe``, ``compute_params`` (called by ``finalize``), ``fake_quant``,
    ``quantize_int``, ``dequantize_int`` and ``export``. Weight quantizers observe only the first batch of a
    calibration pass, because the weight does not change between batches.

    In ``QUANTIZE`` mode a weight quantizer keeps its last output when that output carries no autograd
    graph (no grad needed, a hardened AdaRound, a fixed grid): a fixed weight gives the same fake-quant
    every forward. The cached tensor is reused only while the weight and every parameter and buffer of the
    quantizer are the same storage at the same version (any in-place edit, ``.data`` swap, ``load_state_dict``
    or device move invalidates it) and the mode has not changed since. In-place edits made through ``.data``
    bypass version counting: methods that make them call ``clear_cache()``, and so must outside code.
    """

    family: str = "base"
    granularities: tuple[type, ...] = (PerTensor,)  # the granularities the family can be built with
    symmetric_ok = False  # whether a symmetric grid is meaningful for the family
    uses_observer = True  # False: the family searches its own range and takes no observer
    options: type | None = None  # the family's own options dataclass (its keyword arguments)
    calibration_state: tuple[str, ...] = ()  # buffers only calibration reads (a deployed model leaves them)

    def __init__(self, role: Role, bits: int, name: str = "") -> None:
        super().__init__()
        if not isinstance(role, Role):
            raise TypeError(f"quantizer {name!r}: role must be a Role, got {role!r}")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"quantizer {name!r}: bits must be an int in 2..8, got {bits!r}")
        self.role = role
        self.bits = bits
        self.name = name
        self.__dict__["_weight_cache"] = None
        self.mode = Mode.OFF
        self.drop_p = 0.0
        self.generator: torch.Generator | None = None
        self.register_buffer("calibrated", torch.tensor(False))
        self._observed_batches = 0

    @property
    def granularity(self) -> Granularity:
        """How the family lays its grids over a tensor (per tensor unless the family says otherwise)."""
        return PerTensor()

    @property
    def observed_batches(self) -> int:
        """Batches observed in the current calibration pass."""
        return self._observed_batches

    @property
    def name(self) -> str:
        """Module path plus slot (set by ``api.quantize``); every error message names it."""
        return self.__dict__["_name"]

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_name"] = value
        observer = self.__dict__.get("observer")
        if observer is not None:
            observer.name = value

    @property
    def mode(self) -> Mode:
        """Forward behaviour; every assignment (also the context managers' direct restores) drops the
        cached weight."""
        return self.__dict__["_mode"]

    @mode.setter
    def mode(self, value: Mode) -> None:
        self.__dict__["_mode"] = value
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget the cached fake-quant weight (the next forward recomputes it)."""
        self.__dict__["_weight_cache"] = None

    def train(self, mode: bool = True) -> Quantizer:
        """``nn.Module.train``; also drops the cached weight."""
        self.clear_cache()
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles and deep copies leave the cached weight behind (it is derived state)."""
        state = dict(super().__getstate__())
        state["_weight_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also loads quantizers pickled before ``mode`` became a property (a plain ``mode`` attribute)."""
        state = dict(state)
        if "mode" in state:
            state["_mode"] = state.pop("mode")
        state.setdefault("_weight_cache", None)
        super().__setstate__(state)

    # ----------------------------------------------------------------- mode handling
    def set_mode(self, mode: Mode, drop_p: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Switch mode; leaving CALIBRATE finalizes, entering QUANTIZE/DROP requires calibrated parameters."""
        if not isinstance(mode, Mode):
            raise TypeError(f"quantizer {self.name!r}: mode must be a Mode, got {mode!r}")
        if mode is Mode.DROP and not 0.0 <= drop_p <= 1.0:
            raise ValueError(f"quantizer {self.name!r}: drop_p must be in [0, 1], got {drop_p}")
        if self.mode is Mode.CALIBRATE and mode is not Mode.CALIBRATE:
            self.finalize()
        if mode in (Mode.QUANTIZE, Mode.DROP) and not bool(self.calibrated):
            raise RuntimeError(f"quantizer {self.name!r} ({self.family}) is not calibrated; calibrate first")
        if mode is Mode.CALIBRATE and self.mode is not Mode.CALIBRATE:
            self.reset_statistics()
        self.mode = mode
        self.drop_p = float(drop_p) if mode is Mode.DROP else 0.0
        if generator is not None:
            self.generator = generator

    def reset_statistics(self) -> None:
        """Forget the statistics of a previous calibration pass (subclasses extend)."""
        self._observed_batches = 0

    def finalize(self) -> None:
        """Turn the observed statistics into parameters; called once when leaving CALIBRATE."""
        if self._observed_batches == 0:
            raise RuntimeError(f"quantizer {self.name!r} ({self.family}) saw no data during calibration")
        self.compute_params()
        self.calibrated.fill_(True)
        self.clear_cache()

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, **ctx: Any) -> torch.Tensor:
        """Dispatch on ``self.mode``; ``ctx`` carries side inputs (``value=``, ``next_layer=``)."""
        if self.mode is Mode.OFF:
            return x
        cacheable = self.mode is Mode.QUANTIZE and self.role is Role.WEIGHT
        if cacheable:
            key = self._cache_key(x)
            cached = self.__dict__["_weight_cache"]
            if key is not None and cached is not None and cached[0] == key:
                return cached[2]
        if self.mode is Mode.QUANTIZE and not cacheable and not torch.is_grad_enabled():
            return self._fake_quant_checked(x)
        self.check_finite(x)
        if self.mode is Mode.CALIBRATE:
            if self.role is not Role.WEIGHT or self._observed_batches == 0:
                with torch.no_grad():
                    self.observe(x.detach(), **ctx)
                self._observed_batches += 1
            return x
        if self.mode is Mode.DROP:
            return self.fake_quant(x, self.drop_mask(x))
        xq = self.fake_quant(x)
        if cacheable:
            # a result with a graph must be recomputed (each backward needs its own); the aliases keep the
            # keyed storages alive so that no other tensor can reuse their addresses
            keep = key is not None and not xq.requires_grad
            tensors = self._cache_tensors(x)
            self.__dict__["_weight_cache"] = (key, tuple(t.detach() for t in tensors), xq) if keep else None
        return xq

    def _fake_quant_checked(self, x: torch.Tensor) -> torch.Tensor:
        """``fake_quant(x)`` without autograd, with the NaN/Inf check fused into the fake-quant's own slices
        (``primitives.checking_finite``) instead of a separate pass over ``x``; the paths that do not check
        carry NaN through harmlessly and are checked after."""
        try:
            with checking_finite() as check:
                xq = self.fake_quant(x)
        except NonFiniteInputError:
            raise self._non_finite_error() from None
        if not check.done:
            self.check_finite(x)
        return xq

    def _cache_tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x, *self.parameters(), *self.buffers())

    def _cache_key(self, x: torch.Tensor) -> tuple | None:
        """What the weight's fake-quant depends on: storages and versions of the weight and of every
        parameter and buffer, the weight's layout, the grid's plain attributes, the inference mode and the
        grad mode (a soft AdaRound computed under ``no_grad`` has no graph, but the same call with grad
        enabled needs one); ``None`` (no caching) for inference tensors, which have no version counter."""
        tensors = self._cache_tensors(x)
        if any(t.is_inference() for t in tensors):
            return None
        grid = tuple(self.__dict__.get(a) for a in ("bits", "qmin", "qmax", "ch_axis", "symmetric"))
        return (
            torch.is_inference_mode_enabled(), torch.is_grad_enabled(), grid, x.dtype, x.shape, x.stride(),
            x.storage_offset(),
            *((t.device, t.data_ptr(), t._version) for t in tensors),
        )

    def drop_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Elements that stay float in DROP mode, each with probability ``drop_p`` (``keep_mask`` drawn from
        ``self.generator``)."""
        return keep_mask(x.shape, self.drop_p, self.generator, x.device)

    def check_finite(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming this quantizer when ``x`` holds NaN or Inf.

        One reduction instead of an elementwise mask: a sum of finite values is finite unless it overflows,
        and any NaN or Inf makes it non-finite; only a non-finite sum pays for the full check.
        """
        x = x.detach()
        if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
            raise self._non_finite_error()

    def _non_finite_error(self) -> ValueError:
        """The one NaN/Inf error of both checks, naming this quantizer."""
        return ValueError(f"quantizer {self.name!r} ({self.family}, {self.mode.name}): NaN or Inf input")

    def require_calibrated(self) -> None:
        """Raise when parameters are read before calibration."""
        if not bool(self.calibrated):
            raise RuntimeError(f"quantizer {self.name!r} ({self.family}) is not calibrated; calibrate first")

    # ----------------------------------------------------------------- family interface
    def observe(self, x: torch.Tensor, **ctx: Any) -> None:
        """Accumulate calibration statistics for ``x``."""
        raise NotImplementedError(f"{type(self).__name__}.observe")

    def compute_params(self) -> None:
        """Statistics → parameters, written in place."""
        raise NotImplementedError(f"{type(self).__name__}.compute_params")

    def fake_quant(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the current parameters (differentiable where the family learns);
        the elements where ``keep`` (QDrop's mask) is true stay float, in value and gradient."""
        raise NotImplementedError(f"{type(self).__name__}.fake_quant")

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) of ``x``."""
        raise NotImplementedError(f"{type(self).__name__}.quantize_int")

    def dequantize_int(self, codes: torch.Tensor) -> torch.Tensor:
        """Float values of integer ``codes``; ``dequantize_int(quantize_int(x))`` equals ``fake_quant(x)``."""
        raise NotImplementedError(f"{type(self).__name__}.dequantize_int")

    def export(self) -> dict[str, np.ndarray]:
        """Parameters needed to decode this quantizer's codes, as numpy arrays."""
        raise NotImplementedError(f"{type(self).__name__}.export")

    # ----------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        for key, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            stored = state_dict.get(prefix + key)
            if tensor is not None and stored is not None and stored.shape != tensor.shape:
                tensor.data = torch.empty(stored.shape, dtype=tensor.dtype, device=tensor.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, role={self.role.name}, bits={self.bits}, mode={self.mode.name}"
