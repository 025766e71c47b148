"""One seed for everything random in a PTQ run: calibration sampling, QDrop masks, AdaRound batches.

Each consumer draws from its own *stream*: a ``torch.Generator`` seeded from ``(seed, name, *index)`` by a
hash, so streams never share state and the numbers a unit sees do not depend on how many numbers an earlier
unit (or an earlier, interrupted process) drew. That is what makes a resumed reconstruction identical to an
uninterrupted one. The global RNGs (``random``, ``numpy``, ``torch``) are seeded too, for third-party code,
and their states can be captured and restored with a run's checkpoint.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["calibration_indices", "capture_rng_state", "restore_rng_state", "seed_everything", "stream"]


def _stream_seed(seed: int, name: str, index: tuple[int, ...]) -> int:
    key = ":".join([str(int(seed)), name, *(str(int(i)) for i in index)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def stream(seed: int, name: str, *index: int) -> torch.Generator:
    """A CPU generator for the random stream ``name`` (e.g. ``"qdrop"``, unit 3) of run ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.Generator().manual_seed(_stream_seed(seed, name, tuple(index)))


def seed_everything(seed: int) -> None:
    """Seed the global ``random``, ``numpy`` and ``torch`` generators (for code outside our streams)."""
    generator = stream(seed, "global")
    value = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def calibration_indices(seed: int, population: int, count: int) -> list[int]:
    """``count`` distinct sample indices out of ``population``, sorted; the same for the same seed."""
    if not 0 < count <= population:
        raise ValueError(f"cannot draw {count} calibration samples from a population of {population}")
    order = torch.randperm(population, generator=stream(seed, "calibration"))
    return sorted(int(i) for i in order[:count])


def capture_rng_state() -> dict[str, Any]:
    """The global generators' states as plain tensors and tuples (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by ``capture_rng_state``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
