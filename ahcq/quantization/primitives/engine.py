"""The CPU execution engine of the quantization math: the one seam between the formulas and how they run.

The family modules (``uniform``, ``log``, ``hluq``) state the formulas: encoders, decoders, a forward
``fill`` over a slice and the derivatives of a slice, plus which fused kernel computes the same thing; they
call this module as ``engine.<name>``. It alone decides how those run: ``elementwise`` / ``values`` /
``backward`` pick the fused native kernels (``ahcq.quantization.native``, imported nowhere else) where they
take the tensor, else cache-sized slices (``sliced``, ``fill_slices``, ``sliced_backward``) or one pass;
it also holds the finite-input check (``checking_finite``), QDrop's keep mask inside a slice, the decode
tables and lookups of the table-decoded families and the cache of code thresholds. Replacing this engine,
or dropping its fused paths (``native.usable`` false), must not touch the math.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from ahcq.quantization import native

from .grid import _LOG_FLOOR, _item

SLICE = 1 << 16  # elements per slice of a CPU fake-quant without autograd (see sliced)


# ---------------------------------------------------------------------------------------------------------
# the finite-input check


class NonFiniteInputError(ValueError):
    """NaN or Inf in the input of a fake-quant called inside ``checking_finite``."""


class _FiniteCheck:
    """The state of one ``checking_finite`` block: ``done`` once a fake-quant has checked its input."""

    def __init__(self) -> None:
        self.done = False

    def verify(self, x: Tensor) -> None:
        """Raise ``NonFiniteInputError`` if ``x`` holds NaN or Inf: one reduction, and the elementwise test
        only when the sum is not finite (finite values can overflow it)."""
        if not math.isfinite(_item(x.sum())) and not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError("NaN or Inf input")


_FINITE_CHECK: ContextVar[_FiniteCheck | None] = ContextVar("ahcq_finite_check", default=None)


@contextmanager
def checking_finite() -> Iterator[_FiniteCheck]:
    """Within the block, the fake-quants without autograd reject NaN/Inf input (``NonFiniteInputError``)
    before encoding it: on CPU slice by slice, one reduction over each cache-resident slice just before its
    encoder reads it (instead of a separate pass over the whole input), elsewhere the table-decoded families
    over the whole input first. The yielded check's ``done`` says whether a fake-quant checked; other paths
    (autograd; uniform per channel or off CPU, which carry NaN through) leave the check to the caller."""
    token = _FINITE_CHECK.set(_FiniteCheck())
    try:
        yield _FINITE_CHECK.get()
    finally:
        _FINITE_CHECK.reset(token)


# ---------------------------------------------------------------------------------------------------------
# slicing: cache-sized pieces of a fake-quant, its forward and backward


def values(fill: Callable[[Tensor, Tensor], object], x: Tensor, fused: Callable[[], Tensor] | None = None,
           sliceable: bool = True) -> Tensor:
    """A fake-quant without autograd: ``fused()`` where the kernels take ``x`` (after the whole-tensor
    finite check they need); else ``fill(x_part, out_part)`` over ``sliced`` pieces on CPU (``sliceable``:
    the parameters do not depend on the position), or once into a contiguous output (other devices, per
    channel parameters)."""
    if fused is not None and native.usable(x):
        native_finite_check(x)
        return fused()
    if sliceable and x.device.type == "cpu":
        return sliced(fill, x)
    native_finite_check(x)  # the same whole-tensor check: NaN codes would index outside a decode table
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    fill(x, out)
    return out


def sliced(fill: Callable[[Tensor, Tensor], object], x: Tensor) -> Tensor:
    """``fill(x_part, out_part)`` over slices of at most ``SLICE`` elements of ``x`` (CPU, no autograd).
    The many elementwise passes of an encoder then run on cache-resident temporaries, which the allocator
    reuses instead of mapping fresh pages (page faults cost as much as the arithmetic); 2^16 elements
    measured best, 2^15 and 2^17 within 10 %. A permuted dense tensor (a transposed view) is walked in
    memory order and the result has its layout, as torch's elementwise ops give; any other layout (a slice
    of a wider tensor, e.g. q out of a qkv projection) is walked in blocks of whole trailing dimensions
    (``blocks``) straight into a contiguous result, so it is read once instead of being copied first.
    Inside ``checking_finite`` each slice is checked before ``fill`` reads it."""
    check = _FINITE_CHECK.get()
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    dense = x.permute(order)
    if dense.is_contiguous():
        out = torch.empty_like(dense)
        flat_x, flat_out = dense.view(-1), out.view(-1)
        parts: Iterator[tuple[Tensor, Tensor]] = (
            (flat_x[start:start + SLICE], flat_out[start:start + SLICE])
            for start in range(0, flat_x.numel(), SLICE)
        )
        result = out.permute(sorted(range(x.dim()), key=order.__getitem__))
    else:
        result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        parts = blocks(x, result)
    for part, out_part in parts:
        if check is not None:
            check.verify(part)
        fill(part, out_part)
    if check is not None:
        check.done = True
    return result


def blocks(x: Tensor, out: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Aligned slices of ``x`` (any layout) and of the contiguous ``out`` of its shape, at most ``SLICE``
    elements each: the trailing dimensions that fit in a slice whole, a range of the dimension before them,
    every index of the dimensions before that. The ``out`` slices are contiguous."""
    if x.numel() == 0:
        return
    start, inner = x.dim(), 1
    while start > 0 and inner * x.shape[start - 1] <= SLICE:
        start -= 1
        inner *= x.shape[start]
    if start == 0:
        yield x, out
        return
    chunk_dim, step = start - 1, max(1, SLICE // inner)
    for lead in itertools.product(*(range(n) for n in x.shape[:chunk_dim])):
        x_lead, out_lead = x[lead], out[lead]
        for begin in range(0, x.shape[chunk_dim], step):
            yield x_lead[begin:begin + step], out_lead[begin:begin + step]


def slice_row(x: Tensor, axis: int | None) -> int:
    """How an autograd fake-quant walks ``x``: ``1``: in slices of the flattened tensor (CPU, per-tensor
    parameters); ``C``: in slices of whole rows (CPU, per-channel parameters on the last axis); ``0``: in
    one piece (CUDA, whose fused kernels do not gain from it, or another channel axis)."""
    if x.device.type != "cpu":
        return 0
    if axis is None:
        return 1
    return x.shape[-1] if axis % x.dim() == x.dim() - 1 and x.numel() else 0


def fill_slices(fill: Callable[..., object], tensors: Sequence[Tensor | None], row: int) -> None:
    """``fill(*parts)`` over aligned slices of contiguous tensors of one shape (``None`` stays ``None``),
    each at most ``SLICE`` elements per intra-op thread, of whole rows of ``row`` elements (``row = 0``:
    one call on the whole tensors). A fake-quant's dozens of elementwise passes then run on cache-resident
    temporaries; only the outputs are written to memory (see ``sliced``)."""
    if row == 0:
        fill(*tensors)
        return
    fill_rows(fill, [None if t is None else t.view(-1) if row == 1 else t.view(-1, row) for t in tensors])


def fill_rows(fill: Callable[..., object], tensors: Sequence[Tensor | None],
              per_row: Sequence[Tensor] = ()) -> None:
    """``fill(*parts, *per-row parts)`` over aligned blocks of tensors all ``[N]`` (blocks of elements) or
    all ``[R, K]`` (blocks of whole rows; ``None`` stays ``None``), each at most ``SLICE`` elements per
    intra-op thread; ``per_row``: parameters ``[R, 1]``, sliced with the rows, or 0-d, passed whole."""
    size = SLICE * torch.get_num_threads()  # each thread's share of an op stays cache-sized
    first = tensors[0]
    step = size if first.dim() == 1 else max(1, size // first.shape[1])
    for start in range(0, first.shape[0], step):
        fill(*(None if t is None else t[start:start + step] for t in tensors),
             *(p[start:start + step] if p.dim() else p for p in per_row))


Derivatives = tuple[Tensor, list[Tensor | None]]
"""``(dy/dx, [dy/dparam or None])`` of a slice, for ``sliced_backward``."""


def sliced_backward(
    derivatives: Callable[..., Derivatives], grad: Tensor, saved: Sequence[Tensor | None], row: int,
    axis: int | None, need_x: bool, need_params: Sequence[bool],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The backward of a fake-quant whose forward saved only its inputs and output: ``derivatives(*parts of
    saved)`` recomputes ``(dy/dx, [dy/dparam, or None where not needed])`` for a slice (``row`` as in
    ``fill_slices``), and this returns ``grad * dy/dx`` (``None`` unless ``need_x``) and, per parameter,
    ``sum(grad * dy/dparam)`` (``None`` unless needed) reduced to the parameter: a scalar (``axis=None``) or
    per channel of ``axis``. Recomputing costs a few cache-resident passes; saving the derivatives would
    cost writing and reading whole tensors."""
    grad = grad.contiguous()
    grad_x = torch.empty_like(grad) if need_x else None
    if row == 0:
        slope, ds = derivatives(*saved)
        if grad_x is not None:
            torch.mul(grad, slope, out=grad_x)
        dims = [] if axis is None else [d for d in range(grad.dim()) if d != axis % grad.dim()]
        return grad_x, [None if d is None else (grad * d).sum() if axis is None else (grad * d).sum(dim=dims)
                        if dims else grad * d for d in ds]
    shape = (row,) if row > 1 else ()
    sums = [grad.new_zeros(shape, dtype=torch.float64) if need else None for need in need_params]

    def fill(g: Tensor, gx: Tensor | None, *parts: Tensor | None) -> None:
        slope, ds = derivatives(*parts)
        if gx is not None:
            torch.mul(g, slope, out=gx)
        for total, d in zip(sums, ds):
            if total is not None:
                total += torch.dot(g, d) if row == 1 else torch.mul(g, d).sum(0)

    fill_slices(fill, [grad, grad_x, *saved], row)
    return grad_x, [None if t is None else t.float() for t in sums]


Fused = Callable[[], tuple[Tensor | None, list[float]]]
"""A family's fused backward kernel: ``(gradient for x or None, [float64 sum per parameter])``."""


def elementwise(fill: Callable[..., object], x: Tensor, keep: Tensor | None, row: int,
                fused: Callable[[], Tensor] | None = None) -> Tensor:
    """A fake-quant's forward: ``fused()`` (the family's fused kernel) where the kernels take ``x`` in a
    sliced layout (``row`` > 0, see ``slice_row``), else ``fill(x_part, keep_part, out_part)`` over
    ``fill_slices``."""
    if fused is not None and row and native.usable(x):
        return fused()
    out = torch.empty_like(x)
    fill_slices(fill, [x, keep, out], row)
    return out


def backward(derivatives: Callable[..., Derivatives], grad: Tensor, saved: Sequence[Tensor | None], row: int,
             axis: int | None, need_x: bool, need_params: Sequence[bool], fused: Fused | None = None,
             ) -> tuple[Tensor | None, list[Tensor | None]]:
    """A fake-quant's backward: ``fused()`` where the kernels take the per-tensor layout (``row == 1``),
    its float64 sums returned as the float32 tensors the torch-op path gives; else ``sliced_backward``."""
    if fused is not None and row == 1 and native.usable(saved[0]):
        grad_x, sums = fused()
        return grad_x, [float32_sum(s) if need else None for s, need in zip(sums, need_params)]
    return sliced_backward(derivatives, grad, saved, row, axis, need_x, need_params)


# ---------------------------------------------------------------------------------------------------------
# QDrop's keep mask inside a slice


def keep_values(keep: Tensor | None, x: Tensor, out: Tensor) -> None:
    """QDrop in a forward: ``out`` becomes ``x`` where ``keep``. Float 0/1 products instead of a boolean
    select (``where``/``masked_fill`` cost thirty times more on CPU); exact, both operands being finite."""
    if keep is not None:
        kept = float_mask(keep, out)
        out.mul_(torch.sub(1.0, kept)).addcmul_(x, kept)


def keep_derivatives(keep: Tensor | None, slope: Tensor, param_grads: list[Tensor | None]
                     ) -> tuple[Tensor, list[Tensor | None]]:
    """QDrop in a backward: where ``keep``, the derivative for ``x`` is 1 and for every parameter 0."""
    if keep is None:
        return slope, param_grads
    kept = float_mask(keep, slope)
    quantized = torch.sub(1.0, kept)
    for t in param_grads:
        if t is not None:
            t.mul_(quantized)
    return slope.mul_(quantized).add_(kept), param_grads


def float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask as float 0/1 (through uint8: six times cheaper than from bool on CPU)."""
    return torch.empty_like(like).copy_(mask.view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# table-decoded fake-quants: codes, then a table lookup


Encoder = Callable[[Tensor, Tensor], Tensor]
"""``encode(x, out)``: the float codes of ``x``, written into ``out`` (float32, ``x``'s shape), returned."""

TableKey = tuple[object, ...]
"""The values that define a table-decoded encoder (family, parameters as floats, bits)."""


def codes_buffer(x: Tensor) -> Tensor:
    """A float32 tensor of ``x``'s shape to receive an encoder's codes."""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def decode_table(decode: Callable[..., Tensor], bits: int, device: torch.device, *params) -> Tensor:
    """The value of every code ``0..L-1`` (a decode table, at most 256 entries)."""
    return decode(torch.arange(2**bits, dtype=torch.float32, device=device), *params)


def lookup(levels: Tensor, codes: Tensor, into: Tensor | None = None) -> Tensor:
    """Decode by table lookup: the fake-quants and the dequantizers share it, so they agree bit for bit.

    ``into``: a contiguous float32 tensor of the codes' shape that is no longer needed (the float codes
    themselves) receives the values, saving a large allocation.
    """
    index = codes.to(torch.int32).reshape(-1)
    if into is None:
        return torch.index_select(levels, 0, index).reshape(codes.shape)
    torch.index_select(levels, 0, index, out=into.view(-1))
    return into


def fake_quant_values(encode: Encoder, levels: Tensor, x: Tensor, key: TableKey) -> Tensor:
    """A table-decoded fake-quant without autograd (``values``): the fused kernel through ``encode``'s
    thresholds, or ``encode`` into the output buffer and the lookup into the same storage."""
    thresholds = native_thresholds(x, key, encode, levels)
    fused = None if thresholds is None else lambda: native.table(x, thresholds, levels)
    return values(lambda part, out: lookup(levels, encode(part, out), into=out), x, fused)


def table_fake_quant(x: Tensor, keep: Tensor | None, levels: Tensor, encode: Encoder,
                     key: TableKey) -> tuple[Tensor, Tensor, int]:
    """Forward of the table-decoded families (AGQ, LNQ, HLUQ): the fused kernel, or over cache-sized
    slices codes from ``encode`` and values from ``levels``; QDrop's kept elements copied back. Returns the
    contiguous input, the output and the slice row (for the backward)."""
    x = x.contiguous()
    row = slice_row(x, None)
    thresholds = native_thresholds(x, key, encode, levels)
    if thresholds is not None:
        return x, native.table(x, thresholds, levels, keep), row

    def fill(x_p: Tensor, keep_p: Tensor | None, out_p: Tensor) -> None:
        lookup(levels, encode(x_p, out_p), into=out_p)
        keep_values(keep_p, x_p, out_p)

    return x, elementwise(fill, x, keep, row), row


# ---------------------------------------------------------------------------------------------------------
# the fused native kernels (ahcq.quantization.native)


def native_finite_check(x: Tensor) -> None:
    """Inside ``checking_finite``, the whole-tensor check the fused kernels need (they do not slice)."""
    check = _FINITE_CHECK.get()
    if check is not None:
        check.verify(x)
        check.done = True


_THRESHOLDS: dict[TableKey, Tensor] = {}
_MAX_THRESHOLD_SETS = 1024


def native_thresholds(x: Tensor, key: TableKey, encode: Encoder, levels: Tensor) -> Tensor | None:
    """The code thresholds of ``encode`` when the fused table kernel takes ``x`` (``native``), else None.
    Cached by ``key``: a frozen quantizer searches them once, a learning one once per step."""
    if levels.numel() - 1 > native.MAX_TABLE_THRESHOLDS or not native.usable(x):
        return None
    found = _THRESHOLDS.get(key)
    if found is None:
        if len(_THRESHOLDS) >= _MAX_THRESHOLD_SETS:
            _THRESHOLDS.clear()
        found = _THRESHOLDS[key] = native.code_thresholds(encode, levels.numel())
    return found


def log_clip(log2_scale: float, tau: float) -> float:
    """The least input whose log exponent ``round(tau*(log2(max(x, _LOG_FLOOR)) - log2_scale))`` is above 0,
    i.e. that a log encoder clips to its scale (NaN: none): the fused backward kernels' region test,
    searched with the torch-op expression of the torch-op backward (``native.code_thresholds``)."""
    key = ("log-clip", log2_scale, tau)
    found = _THRESHOLDS.get(key)
    if found is None:
        def above(x: Tensor, out: Tensor) -> Tensor:
            exponent = torch.clamp(x, min=_LOG_FLOOR, out=out).log2_().sub_(log2_scale).mul_(tau)
            return exponent.round_().clamp_(0, 1)

        if len(_THRESHOLDS) >= _MAX_THRESHOLD_SETS:
            _THRESHOLDS.clear()
        found = _THRESHOLDS[key] = native.code_thresholds(above, 2)
    return _item(found)


def float32_sum(total: float) -> Tensor:
    """A float64 gradient sum as the float32 0-d tensor the torch-op backward returns."""
    return torch.tensor(total, dtype=torch.float64).float()


def native_uniform(x: Tensor, inv: Tensor, lo: Tensor | float, hi: Tensor | float, scale: Tensor,
                   keep: Tensor | None) -> Tensor:
    """The uniform fake-quant by the fused kernels (``native``): per tensor (0-d ``scale``) or per channel
    of the last axis of the contiguous ``x`` (``[C]``), with the grid's float32 reciprocal ``inv`` and
    bounds ``lo``, ``hi`` (``uniform._grid``)."""
    if scale.dim() == 0:
        return native.uniform(x, _item(inv), float(lo), float(hi), _item(scale), keep)
    return native.uniform_rows(x, inv, lo, hi, scale, keep)


def native_uniform_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, inv: Tensor,
                            lo: float, hi: float, need_x: bool) -> tuple[Tensor | None, float]:
    """The per-tensor uniform backward by the fused kernel: the gradient for ``x`` (``None`` unless
    ``need_x``) and the float64 sum for the scale, before its ``1/s`` (see ``float32_sum``)."""
    return native.uniform_backward(x, out, keep, grad, _item(inv), lo, hi, need_x)


def native_agq_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, log2_scale: float,
                        tau: float, need_x: bool) -> tuple[Tensor | None, float]:
    """The AGQ backward by the fused kernel, its clipped region from ``log_clip``: the gradient for ``x``
    and the float64 sum for the scale."""
    return native.agq_backward(x, out, keep, grad, log_clip(log2_scale, tau), need_x)


def native_hluq_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, x_min: float,
                         s1: float, s2: float, switch: float, steps: int, log2_s1: float, need_x: bool
                         ) -> tuple[Tensor | None, float, float, float]:
    """The HLUQ backward by the fused kernel, its log-clipped region from ``log_clip``: the gradient for
    ``x`` and the float64 sums for ``s1``, ``s2`` and ``x_min``."""
    return native.hluq_backward(x, out, keep, grad, x_min, s1, s2, switch, steps, log_clip(log2_s1, 1.0),
                                need_x)
