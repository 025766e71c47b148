"""Quantized layers with fixed quantizer slots: ``QuantLinear``, ``QuantConv2d`` and ``QuantMatMul``.

A slot holds a ``Quantizer`` or ``None``; ``None`` means the slot is disabled and acts as the identity
(``Mode.OFF`` is for switching an existing quantizer off temporarily). ``from_float`` reuses the float
module's ``weight``/``bias`` Parameter objects, and ``to_float`` returns a float module sharing them, so
swapping copies no weights. The input quantizer receives ``next_layer=`` (the float layer applied to its
argument) for output-aware searches (HLUQ); the first operand of ``QuantMatMul`` receives ``value=`` (the
second operand) for value-aware searches (LNQ, AGQ).

An in-place weight transform that changes what the float layer computes (ACNR) first calls
``remember_float_weight()``; ``float_reference()`` then runs the layer on that original weight, which is how
``api.quantization_disabled`` makes every float target the model as it was before the transform.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers.base import Quantizer

__all__ = ["QuantConv2d", "QuantLayer", "QuantLinear", "QuantMatMul", "apply_slot"]


def _check_slot(q: Quantizer | None, slot: str) -> Quantizer | None:
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(f"{slot} must be a Quantizer or None, got {type(q).__name__}")
    return q


def apply_slot(q: nn.Module | None, x: torch.Tensor, **ctx: object) -> torch.Tensor:
    """A quantizer slot on ``x``: the identity when the slot is empty (``None``), else its module with the
    side inputs (``next_layer=``, ``value=``)."""
    return x if q is None else q(x, **ctx)


class QuantLayer(nn.Module):
    """The slot layout shared by ``QuantLinear`` and ``QuantConv2d``: input, weight and output quantizers
    around ``_op(x, weight)``, and the float reference of the weight."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_slots(self, input_quantizer: Quantizer | None, weight_quantizer: Quantizer | None,
                    output_quantizer: Quantizer | None) -> None:
        self.input_quantizer = _check_slot(input_quantizer, "input_quantizer")
        self.weight_quantizer = _check_slot(weight_quantizer, "weight_quantizer")
        self.output_quantizer = _check_slot(output_quantizer, "output_quantizer")
        self.register_buffer("float_weight", None, persistent=False)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float layer (unquantized weight) on ``x``."""
        return self._op(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_slot(self.input_quantizer, x, next_layer=self.float_forward)
        w = apply_slot(self.weight_quantizer, self.weight)
        return apply_slot(self.output_quantizer, self._op(x, w))

    def remember_float_weight(self) -> None:
        """Keep the weight as it is now as the layer's float reference (once: the first call wins), before
        an in-place transform changes it."""
        if self.float_weight is None:
            self.float_weight = self.weight.detach().clone()

    @contextmanager
    def float_reference(self) -> Iterator[None]:
        """Within the block the layer's weight is its float reference (if one was remembered).

        The Parameter object is swapped, not its data, so a graph built inside the block keeps the tensor it
        used after the block ends.
        """
        if self.float_weight is None:
            yield
            return
        current = self._parameters["weight"]
        self._parameters["weight"] = nn.Parameter(self.float_weight, requires_grad=False)
        try:
            yield
        finally:
            self._parameters["weight"] = current


class QuantLinear(QuantLayer):
    """``nn.Linear`` with input, weight and optional output quantizers."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        input_quantizer: Quantizer | None = None,
        weight_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"QuantLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_slots(input_quantizer, weight_quantizer, output_quantizer)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        input_quantizer: Quantizer | None = None,
        weight_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
    ) -> QuantLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, input_quantizer, weight_quantizer, output_quantizer)

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class QuantConv2d(QuantLayer):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) with quantizer slots."""

    def __init__(
        self,
        conv: nn.Conv2d,
        input_quantizer: Quantizer | None = None,
        weight_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d needs an nn.Conv2d, got {type(conv).__name__}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._init_slots(input_quantizer, weight_quantizer, output_quantizer)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        input_quantizer: Quantizer | None = None,
        weight_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
    ) -> QuantConv2d:
        return cls(conv, input_quantizer, weight_quantizer, output_quantizer)

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device="meta",
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}")


class QuantMatMul(nn.Module):
    """``a @ b`` with a quantizer on each operand (q @ k^T, attention probabilities @ v)."""

    def __init__(self, a_quantizer: Quantizer | None = None, b_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.a_quantizer = _check_slot(a_quantizer, "a_quantizer")
        self.b_quantizer = _check_slot(b_quantizer, "b_quantizer")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(apply_slot(self.a_quantizer, a, value=b), apply_slot(self.b_quantizer, b))
