"""Fused CPU fake-quant kernels (``native_kernels.c``), built on first use with the system C compiler.

The torch-op encoders make a dozen elementwise passes per fake-quant (a transcendental among them for the
log families); the kernels make one. They are an exact accelerator, not a second definition: the uniform
kernels run the same IEEE float32 operations as torch's fake-quant ops, and the table kernel decodes the
code that the torch-op encoder gives, through that encoder's thresholds (``code_thresholds``). Where no C
compiler is found, or ``AHCQ_NATIVE=0``, every caller keeps the torch-op path.

The library is cached under ``${AHCQ_CACHE:-${XDG_CACHE_HOME:-~/.cache}/ahcq}/kernels``, keyed by the
source, the compiler and the CPU (it is built for the host's instruction set).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_kernels.c")
MAX_TABLE_THRESHOLDS = 63
"""Above 6 bits the threshold count outweighs the saved passes; the torch-op path is used instead."""
MIN_ELEMENTS = 1 << 15
"""Smaller tensors keep the torch-op path: thresholds cost a search per parameter set (see
``code_thresholds``), repaid only by large tensors."""
_PARALLEL_ELEMENTS = 1 << 18
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("AHCQ_CACHE") or Path(xdg) / "ahcq") / "kernels"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    """Compile the kernels once per (source, compiler, flags, CPU); the file appears atomically."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *_FLAGS, _cpu_signature()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"ahcq_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                       check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (disabled, no compiler, or the build failed: warned once)."""
    if os.environ.get("AHCQ_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("ahcq: no C compiler found; fake-quant runs on torch ops (slower)", stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"ahcq: fake-quant kernels not built ({detail}); using torch ops (slower)",
                      stacklevel=2)
        return None
    lib.ahcq_uniform.argtypes = [_P, _P, _P, _I64, _F, _F, _F, _F]
    lib.ahcq_uniform_rows.argtypes = [_P, _P, _P, _I64, _I64, _P, _P, _P, _P]
    lib.ahcq_table.argtypes = [_P, _P, _P, _I64, _P, _I32, _P]
    lib.ahcq_uniform_strided.argtypes = [_P, _P, _P, _I64, _I64, _F, _F, _F, _F]
    lib.ahcq_table_strided.argtypes = [_P, _P, _P, _I64, _I64, _P, _I32, _P]
    lib.ahcq_uniform_backward.argtypes = [_P, _P, _P, _P, _P, _I64, _F, _F, _F, _P]
    lib.ahcq_hluq_backward.argtypes = [_P, _P, _P, _P, _P, _I64, _F, _F, _F, _F, _F, _F, _P]
    lib.ahcq_agq_backward.argtypes = [_P, _P, _P, _P, _P, _I64, _F, _P]
    for fn in (lib.ahcq_uniform, lib.ahcq_uniform_rows, lib.ahcq_table, lib.ahcq_uniform_strided,
               lib.ahcq_table_strided, lib.ahcq_uniform_backward, lib.ahcq_hluq_backward,
               lib.ahcq_agq_backward):
        fn.restype = None
    return lib


def usable(x: Tensor) -> bool:
    """Whether a fake-quant of ``x`` goes through the kernels: float32 on CPU, large enough, built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= MIN_ELEMENTS
            and library() is not None)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ahcq-fq")


def _run(kernel: Callable[[int, int], None], n: int, align: int = 1, cost: int = 1) -> None:
    """``kernel(start, stop)`` over ``[0, n)``, split across torch's intra-op threads (ctypes releases the
    GIL during each call); chunk bounds are multiples of ``align`` (whole rows); ``cost``: elements per
    index (rows)."""
    threads = torch.get_num_threads()
    if threads == 1 or n * cost < _PARALLEL_ELEMENTS:
        kernel(0, n)
        return
    units = n // align
    bounds = [align * (units * i // threads) for i in range(threads)] + [n]
    list(_pool(threads).map(kernel, bounds[:-1], bounds[1:]))


_MIN_ROW = 16
"""Shortest contiguous row walked in place by the strided kernels; shorter ones are copied first."""


def _row_offsets(x: Tensor) -> Tensor | None:
    """Element offsets of the contiguous last-axis rows of a non-dense ``x`` (a slice of a wider tensor),
    or None when its last axis is not contiguous or too short (``x`` is then copied)."""
    if x.dim() < 2 or x.stride(-1) != 1 or x.shape[-1] < _MIN_ROW:
        return None
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    return offsets.reshape(-1).contiguous()


def _apply(x: Tensor, flat: Callable[[Tensor, Tensor, int, int], None],
           strided: Callable[[Tensor, Tensor, int, int], None]) -> Tensor:
    """Run a kernel over ``x`` in memory order, without a copy where possible: ``flat(x, out, start,
    stop)`` on a dense ``x`` (any permutation; the result keeps its layout), ``strided(offsets, out,
    first_row, end_row)`` on rows of a strided ``x`` (into a contiguous result), else ``flat`` on a copy."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    dense = x.permute(order)
    if dense.is_contiguous():
        out = torch.empty_like(dense)
        _run(lambda start, stop: flat(dense, out, start, stop), dense.numel())
        return out.permute(sorted(range(x.dim()), key=order.__getitem__))
    offsets = _row_offsets(x)
    if offsets is None:
        return _apply(x.contiguous(), flat, strided)
    out = torch.empty(x.shape, dtype=x.dtype)
    _run(lambda start, stop: strided(offsets, out, start, stop), offsets.numel(), cost=x.shape[-1])
    return out


def _ptr(t: Tensor | None, offset: int = 0) -> int | None:
    return None if t is None else t.data_ptr() + offset * t.element_size()


def _keep_bytes(keep: Tensor | None) -> Tensor | None:
    return None if keep is None else keep.contiguous().view(torch.uint8)


def uniform(x: Tensor, inv: float, lo: float, hi: float, scale: float, keep: Tensor | None = None) -> Tensor:
    """``scale * (clamp(round(x * inv), lo, hi) + 0)`` per tensor (``keep``: QDrop), in ``x``'s layout when
    ``x`` is dense, else contiguous (``_apply``)."""
    lib = library()
    if keep is not None:
        x = x.contiguous()
    keep_b = _keep_bytes(keep)

    def flat(x: Tensor, out: Tensor, start: int, stop: int) -> None:
        lib.ahcq_uniform(_ptr(x, start), _ptr(keep_b, start), _ptr(out, start), stop - start,
                         inv, lo, hi, scale)

    def strided(offsets: Tensor, out: Tensor, first: int, end: int) -> None:
        row = out.shape[-1]
        lib.ahcq_uniform_strided(_ptr(x), _ptr(offsets, first), _ptr(out, first * row), end - first, row,
                                 inv, lo, hi, scale)

    return _apply(x, flat, strided)


def uniform_rows(x: Tensor, inv: Tensor, lo: Tensor, hi: Tensor, scale: Tensor,
                 keep: Tensor | None = None) -> Tensor:
    """The per-channel uniform fake-quant along the last axis of the contiguous ``x`` (float32 ``[C]``
    grids)."""
    lib = library()
    channels = x.shape[-1]
    out = torch.empty_like(x)
    keep_b = _keep_bytes(keep)
    grids = [t.float().contiguous() for t in (inv, lo, hi, scale)]

    def kernel(start: int, stop: int) -> None:
        lib.ahcq_uniform_rows(_ptr(x, start), _ptr(keep_b, start), _ptr(out, start),
                              (stop - start) // channels, channels, *(_ptr(g) for g in grids))

    _run(kernel, x.numel(), channels)
    return out


def table(x: Tensor, thresholds: Tensor, levels: Tensor, keep: Tensor | None = None) -> Tensor:
    """``levels[#{j : x >= thresholds[j]}]`` (``keep``: QDrop), in ``x``'s layout when ``x`` is dense."""
    lib = library()
    if keep is not None:
        x = x.contiguous()
    keep_b = _keep_bytes(keep)
    thresholds, levels = thresholds.contiguous(), levels.contiguous()

    def flat(x: Tensor, out: Tensor, start: int, stop: int) -> None:
        lib.ahcq_table(_ptr(x, start), _ptr(keep_b, start), _ptr(out, start), stop - start,
                       _ptr(thresholds), thresholds.numel(), _ptr(levels))

    def strided(offsets: Tensor, out: Tensor, first: int, end: int) -> None:
        row = out.shape[-1]
        lib.ahcq_table_strided(_ptr(x), _ptr(offsets, first), _ptr(out, first * row), end - first, row,
                               _ptr(thresholds), thresholds.numel(), _ptr(levels))

    return _apply(x, flat, strided)


def _backward(call: Callable[..., None], x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor,
              need_x: bool, params: int, *scalars: float) -> tuple[Tensor | None, list[float]]:
    """Run a backward kernel over the contiguous ``x``, ``out``, ``keep`` and ``grad`` of one shape: the
    input gradient (None unless ``need_x``) and, per parameter, the sum of ``grad * dy/dparam``; each thread
    sums its own chunk."""
    grad = grad.contiguous()
    grad_x = torch.empty_like(grad)
    keep_b = _keep_bytes(keep)
    threads = torch.get_num_threads() if x.numel() >= _PARALLEL_ELEMENTS else 1
    sums = torch.zeros(threads, params, dtype=torch.float64)
    bounds = [x.numel() * i // threads for i in range(threads + 1)]

    def kernel(chunk: int) -> None:
        start, stop = bounds[chunk], bounds[chunk + 1]
        call(_ptr(x, start), _ptr(out, start), _ptr(keep_b, start), _ptr(grad, start), _ptr(grad_x, start),
             stop - start, *scalars, _ptr(sums[chunk]))

    if threads == 1:
        kernel(0)
    else:
        list(_pool(threads).map(kernel, range(threads)))
    return grad_x if need_x else None, sums.sum(0).tolist()


def uniform_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, inv: float, lo: float,
                     hi: float, need_x: bool) -> tuple[Tensor | None, float]:
    """The per-tensor uniform fake-quant's backward: ``grad`` times the in-range mask, and
    ``sum(grad * (y - x*inside))`` (the LSQ scale gradient times the scale)."""
    grad_x, (ds,) = _backward(library().ahcq_uniform_backward, x, out, keep, grad, need_x, 1, inv, lo, hi)
    return grad_x, ds


def hluq_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, x_min: float, s1: float,
                  s2: float, uniform_switch: float, steps: int, log_clip: float, need_x: bool
                  ) -> tuple[Tensor | None, float, float, float]:
    """The HLUQ fake-quant's backward (see ``_FakeQuantHLUQ``): the input gradient and the sums for ``s1``,
    ``s2`` and ``x_min``; ``log_clip``: the least ``u = x - x_min`` whose log code is clipped to ``s1``."""
    grad_x, (ds1, ds2, dx_min) = _backward(library().ahcq_hluq_backward, x, out, keep, grad, need_x, 3, x_min,
                                           s1, s2, uniform_switch, float(steps), log_clip)
    return grad_x, ds1, ds2, dx_min


def agq_backward(x: Tensor, out: Tensor, keep: Tensor | None, grad: Tensor, clip: float, need_x: bool
                 ) -> tuple[Tensor | None, float]:
    """The AGQ fake-quant's backward; ``clip``: the least ``x`` clipped to the scale."""
    grad_x, (ds,) = _backward(library().ahcq_agq_backward, x, out, keep, grad, need_x, 1, clip)
    return grad_x, ds


_PROBE = 256
"""Inputs per encoder evaluation in the threshold search: a multiple of twice every vector width, so that
each probe takes the vectorised path of torch's elementwise ops, as the bulk of a large tensor does."""


def code_thresholds(encode: Callable[[Tensor, Tensor], Tensor], codes: int) -> Tensor:
    """The least float32 input reaching each code ``1..codes-1`` of the monotone CPU ``encode`` (float codes
    ``0..codes-1``), NaN for a code no input reaches: with them ``table`` gives ``levels[encode(x)]``.

    A bisection over the ordered float32 bit patterns from -inf to +inf, all codes at once: 33 encoder
    calls on a multiple of ``_PROBE`` inputs."""
    wanted = torch.arange(1, codes, dtype=torch.float32)
    first, last = _order_key(torch.tensor(float("-inf"))), _order_key(torch.tensor(float("inf")))
    lo = torch.full((codes - 1,), first, dtype=torch.int64)
    hi = torch.full((codes - 1,), last + 1, dtype=torch.int64)
    size = -(-codes // _PROBE) * _PROBE
    probe, scratch = torch.zeros(size), torch.empty(size)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        probe[:codes - 1] = _from_order_key(mid.clamp(max=last))
        reached = encode(probe, scratch)[:codes - 1] >= wanted
        hi = torch.where(reached & (lo < hi), mid, hi)
        lo = torch.where(~reached & (lo < hi), mid + 1, lo)
    values = _from_order_key(lo.clamp(max=last))
    return torch.where(lo > last, torch.tensor(float("nan")), values)


def _order_key(x: Tensor) -> int:
    """An integer that orders float32 values as the floats are ordered (-0 just below +0)."""
    bits = int(x.float().view(torch.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _from_order_key(keys: Tensor) -> Tensor:
    bits = torch.where(keys >= 0, keys, -(keys + 1) | -(1 << 31))
    return bits.to(torch.int32).view(torch.float32)
