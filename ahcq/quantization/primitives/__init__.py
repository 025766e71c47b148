"""Stateless quantization math: the only place where a quantization formula lives.

Every family has an encoder (``quantize_*`` -> int32 codes), a decoder (``dequantize_*``) and a fake-quant
(``fake_quant_*``) with ``fake_quant(x) == dequantize(quantize(x))`` bit for bit: the fake-quant runs the
same encoder and decodes through the same code (uniform: the same integer-valued float ops; log families:
the same decode table), and its autograd Function supplies the straight-through gradients for ``x`` and the
learnable parameters: it saves its input and output instead of a graph of intermediates, and its backward
recomputes the derivatives slice by slice (``engine.sliced_backward``). ``keep=`` fuses QDrop's
float/quantized mix into the fake-quant.

What lives where (each module reads top to bottom on its own):

- ``grid``: the grid basics every family shares: the bit-width limits and constants, ``qrange``,
  ``qparams_from_minmax``, ``view_along``, ``grad_scale``, ``expand_groups`` and the
  argument checks.
- ``uniform``: the uniform affine family, bit-exact with torch's fake-quant ops.
- ``log``: the table-decoded log families: AGQ (power-of-two with ``tau = 1``) and LNQ.
- ``hluq``: hybrid log-uniform quantization.
- ``engine``: how the math executes on CPU, and nothing else: the finite-input check
  (``checking_finite``), cache-sized slicing, QDrop's keep mask inside a slice, decode tables and their
  lookups, and every dispatch to the fused native kernels (``ahcq.quantization.native``) with their
  code-threshold cache. The family modules call it as ``engine.<name>``; none of them imports ``native``.
"""
from __future__ import annotations

from .engine import NonFiniteInputError, checking_finite
from .grid import MAX_BITS as MAX_BITS  # not in __all__, as before; imported by the quantizers and tests
from .grid import MIN_BITS as MIN_BITS
from .grid import SCALE_EPS as SCALE_EPS
from .grid import (
    expand_groups,
    grad_scale,
    qparams_from_minmax,
    qrange,
    view_along,
)
from .hluq import dequantize_hluq, fake_quant_hluq, quantize_hluq
from .log import (
    dequantize_agq,
    dequantize_lnq,
    fake_quant_agq,
    fake_quant_lnq,
    quantize_agq,
    quantize_lnq,
)
from .uniform import dequantize_uniform, fake_quant_uniform, quantize_uniform

__all__ = [
    "NonFiniteInputError",
    "checking_finite",
    "qrange",
    "qparams_from_minmax",
    "view_along",
    "grad_scale",
    "fake_quant_uniform",
    "quantize_uniform",
    "dequantize_uniform",
    "expand_groups",
    "quantize_agq",
    "dequantize_agq",
    "fake_quant_agq",
    "quantize_lnq",
    "dequantize_lnq",
    "fake_quant_lnq",
    "quantize_hluq",
    "dequantize_hluq",
    "fake_quant_hluq",
]
