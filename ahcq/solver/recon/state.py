"""Resumable reconstruction state: written atomically after every finished unit.

The state holds the whole model ``state_dict`` (quantizer parameters and buffers included: AdaRound logits
and ``hard`` flags, CAG groups), the global RNG states, the index of the next unit, the unit names and the
settings. The next unit's quantized inputs are not stored (they can be tens of GB): on resume they are
recomputed by the float capture pass and by running the finished units once each on the cached chunks.
Every random stream of a unit is derived from ``(seed, unit)``, so the resumed run draws exactly what the
uninterrupted one would have drawn.

Data-parallel ranks each save their own state, so a run killed between two ranks' saves leaves them one
unit apart. With ``keep_previous`` a save keeps the state it replaces (``recon_state.prev.pt``); on resume
the ranks agree on the latest unit every one of them holds (``saved_units``) and load that one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ahcq.seeding import capture_rng_state, restore_rng_state

from .settings import ReconSettings

__all__ = ["PREVIOUS_FILE", "STATE_FILE", "load_state", "save_state", "saved_units"]

STATE_FILE = "recon_state.pt"
PREVIOUS_FILE = "recon_state.prev.pt"
FORMAT = 1


def save_state(directory: str | Path, model: nn.Module, next_unit: int, unit_names: list[str],
               settings: ReconSettings, keep_previous: bool = False) -> Path:
    """Write the state of a run whose units before ``next_unit`` are finished (atomically); with
    ``keep_previous`` the state it replaces stays as ``PREVIOUS_FILE``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
    payload = {
        "format": FORMAT,
        "next_unit": next_unit,
        "unit_names": list(unit_names),
        "settings": settings.as_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "rng": capture_rng_state(),
    }
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, directory / PREVIOUS_FILE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def saved_units(directory: str | Path) -> dict[int, Path]:
    """The saved states in ``directory`` by the index of their next unit."""
    found = {}
    for name in (PREVIOUS_FILE, STATE_FILE):
        path = Path(directory) / name
        if path.is_file():
            found[int(torch.load(path, weights_only=True)["next_unit"])] = path
    return found


def load_state(directory: str | Path, model: nn.Module, unit_names: list[str],
               settings: ReconSettings, name: str = STATE_FILE) -> int | None:
    """Restore the saved state ``name`` (the latest by default) into ``model``; the index of the next unit,
    or ``None`` when there is none.

    A state written for other units or other settings is refused: mixing them would give a model that no
    single run produces.
    """
    path = Path(directory) / name
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown reconstruction state format {payload.get('format')!r}")
    if payload["unit_names"] != list(unit_names):
        raise ValueError(f"{path}: saved for units {payload['unit_names']}, not {list(unit_names)}")
    saved, wanted = payload["settings"], settings.as_dict()
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        raise ValueError(f"{path}: saved with other settings ({', '.join(changed)}); "
                         f"use a new state directory or the same settings")
    model.load_state_dict(payload["model"])
    restore_rng_state(payload["rng"])
    return int(payload["next_unit"])
