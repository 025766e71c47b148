"""Activation cache of the reconstruction: CPU memory up to a byte budget, then chunks on disk.

Entries are nested ``(args, kwargs)`` / output structures of tensors. Tensors are stored *compactly*: a
dimension broadcast with stride 0 (a per-image embedding expanded over its boxes) keeps one copy and is
re-expanded on load, so the cache pays for what is distinct, not for what was materialised by ``expand``.

``storage_dtype`` (``recon.cache_dtype``) halves the cache with float16 or bfloat16 copies of the float32
tensors (those whose values the narrower type holds: finite and within its range; others stay float32);
they come back as float32, rounded to the narrower type's precision.

Item axis: dim 0 of a sample's tensors (boxes of an image, windows of an image). ``ItemPlan`` caps the
items kept per sample (a seeded random subset, recorded) and splits them into chunks, so one optimizer step
and one propagation forward touch one chunk; memory per step is then bounded whatever the box count.
"""
from __future__ import annotations

import enum
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ahcq.seeding import stream

from .units import map_tensors, tensor_leaves

__all__ = ["ActivationCache", "CacheKey", "Entry", "ItemPlan", "compact_copy", "nbytes", "select_items"]

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Entry(enum.Enum):
    """What a cache entry of a unit holds for one (sample, chunk)."""

    FLOAT_IN = "fin"  # its inputs in the float model
    FLOAT_OUT = "fout"  # its compared outputs in the float model (the targets)
    QUANT_IN = "qin"  # its inputs from the quantized units before it


class CacheKey(NamedTuple):
    """The key of one cache entry: what it holds, for which unit, sample and item chunk."""

    entry: Entry
    unit: int
    sample: int
    chunk: int


def compact_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached CPU copy of ``t`` (cast to ``dtype`` when given); broadcast (stride-0) dimensions stay
    broadcast views of one copy."""
    t = t.detach()
    base = t
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            base = base.narrow(d, 0, 1)
    base = base.to("cpu", dtype=dtype or base.dtype, copy=True).contiguous()
    return base.expand(t.shape) if base.shape != t.shape else base


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the float32 ``t`` is stored as ``dtype``: finite and inside its range."""
    if t.dtype != torch.float32 or dtype == torch.float32 or t.numel() == 0:
        return False
    return float(t.detach().abs().max()) <= torch.finfo(dtype).max  # False for NaN


def nbytes(value: Any) -> int:
    """Bytes held by the distinct storages of the tensors in ``value``."""
    storages = {}
    for t in tensor_leaves(value):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def select_items(value: Any, n_items: int, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of every tensor whose dim 0 is the item axis (size ``n_items``); others unchanged.

    A broadcast item axis stays broadcast (the selection only changes its length).
    """
    def pick(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != n_items:
            return t
        length = len(range(n_items)[index]) if isinstance(index, slice) else int(index.numel())
        if t.stride(0) == 0 and n_items > 1:
            return t.narrow(0, 0, 1).expand(length, *t.shape[1:])
        return t[index]
    return map_tensors(value, pick)


@dataclass(frozen=True)
class ItemPlan:
    """Cap and chunking of the item axis: at most ``max_items`` items per sample (a seeded subset, the same
    for every unit of a sample with the same item count), in chunks of ``chunk_items``."""

    seed: int = 0
    max_items: int | None = None
    chunk_items: int | None = None

    def __post_init__(self) -> None:
        for key in ("max_items", "chunk_items"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"ItemPlan: {key} must be >= 1 or None, got {value}")

    def kept(self, sample: int, n_items: int) -> torch.Tensor | slice:
        """The items of ``sample`` that are cached (all of them unless capped)."""
        if self.max_items is None or n_items <= self.max_items:
            return slice(None)
        order = torch.randperm(n_items, generator=stream(self.seed, "items", sample, n_items))
        return order[: self.max_items].sort().values

    def chunks(self, n_kept: int) -> list[slice]:
        """Slices of the kept items, one per chunk."""
        size = self.chunk_items or max(n_kept, 1)
        return [slice(i, min(i + size, n_kept)) for i in range(0, max(n_kept, 1), size)]

    def split(self, value: Any, sample: int, n_items: int) -> list[Any]:
        """``value`` capped and cut into chunks along its item axis."""
        kept = self.kept(sample, n_items)
        value = select_items(value, n_items, kept)
        n_kept = n_items if isinstance(kept, slice) else int(kept.numel())
        return [select_items(value, n_kept, s) for s in self.chunks(n_kept)]


class ActivationCache:
    """Key → nested tensors; in memory up to ``max_bytes``, beyond that one ``torch.save`` file per entry.

    ``directory`` holds the spilled chunks (a private temporary folder when ``None``; removed by ``close``).
    """

    def __init__(self, max_bytes: int, directory: str | Path | None = None,
                 storage_dtype: torch.dtype = torch.float32) -> None:
        if max_bytes < 0:
            raise ValueError(f"ActivationCache: max_bytes must be >= 0, got {max_bytes}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"ActivationCache: storage_dtype must be one of {list(STORAGE_DTYPES)}, got "
                             f"{storage_dtype}")
        self.max_bytes = int(max_bytes)
        self.storage_dtype = storage_dtype
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="recon-cache-")) if self._own_dir else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[Hashable, tuple[Any, int, list[bool]]] = {}
        self._disk: dict[Hashable, Path] = {}
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_bytes = 0
        self._counter = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def keys(self) -> Iterator[Hashable]:
        yield from list(self._memory)
        yield from list(self._disk)

    def _narrow(self, value: Any) -> tuple[Any, list[bool]]:
        """Compact CPU copies in the storage type where it holds them, and which leaves were narrowed."""
        narrowed: list[bool] = []

        def store(t: torch.Tensor) -> torch.Tensor:
            narrowed.append(_fits(t, self.storage_dtype))
            return compact_copy(t, self.storage_dtype if narrowed[-1] else None)

        return map_tensors(value, store), narrowed

    @staticmethod
    def _widen(value: Any, narrowed: list[bool]) -> Any:
        if not any(narrowed):
            return value
        flags = iter(narrowed)
        return map_tensors(value, lambda t: compact_copy(t, torch.float32) if next(flags) else t)

    def as_stored(self, value: Any) -> Any:
        """``value`` as ``get`` would return it after ``put``: at the storage type's precision."""
        return self._widen(*self._narrow(value))

    def put(self, key: Hashable, value: Any) -> None:
        """Store a compact CPU copy of ``value`` under ``key`` (replacing an older entry)."""
        self.pop(key)
        value, narrowed = self._narrow(value)
        size = nbytes(value)
        if self.memory_bytes + size <= self.max_bytes:
            self._memory[key] = (value, size, narrowed)
            self.memory_bytes += size
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        self._counter += 1
        path = self.directory / f"chunk-{self._counter:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"value": value, "narrowed": narrowed}, tmp)
        os.replace(tmp, path)
        self._disk[key] = path
        self.spilled_bytes += size

    def get(self, key: Hashable) -> Any:
        if key in self._memory:
            value, _, narrowed = self._memory[key]
        elif key in self._disk:
            stored = torch.load(self._disk[key], weights_only=True)
            value, narrowed = stored["value"], stored["narrowed"]
        else:
            raise KeyError(f"activation cache has no entry {key!r}")
        return self._widen(value, narrowed)

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (and delete its file); absent keys are ignored."""
        if key in self._memory:
            self.memory_bytes -= self._memory.pop(key)[1]
        path = self._disk.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop every entry and delete the spilled files (and the folder if the cache created it)."""
        for key in list(self.keys()):
            self.pop(key)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
