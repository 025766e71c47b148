"""Run identity: a fingerprint of everything that decides a run's result, and the ``--out`` folder protocol
that never lets one run report another run's model.

A run works in a staging folder next to ``--out`` (``.<name>.partial``) that holds its fingerprint
(``run.json``), its resumable state and its partial outputs; it is renamed to ``--out`` only when the run
has finished, so ``--out`` only ever holds one complete run. Before any work, ``RunFolder.open``:

* resumes a staging folder whose fingerprint equals this run's, and refuses one that differs, naming the
  components that differ and the two ways out (a new ``--out``, or ``--overwrite``);
* finds an identical finished run in ``--out`` (nothing to do) and refuses a different one the same way;
* refuses an ``--out`` that is not a folder, or a non-empty folder that holds no run.

``--overwrite`` discards the staging folder and replaces ``--out`` when the run finishes.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ahcq
from ahcq.solver.results import RESULTS_NAME, write_json

__all__ = ["RUN_FILE", "RunFolder", "RunMismatch", "code_version", "digest", "plugin_root", "source_digest",
           "weights_digest"]

RUN_FILE = "run.json"
PLUGIN = "projects.instance_segment_anything"
FORMAT = 1


class RunMismatch(Exception):
    """``--out`` or its staging folder holds something this run may not use; the message says what."""


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer: name, dtype, shape and bytes (the exact weights)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plugin_root() -> Path | None:
    """The mmdet plugin's folder, found without importing it (the library never imports the plugin)."""
    spec = importlib.util.find_spec(PLUGIN)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def source_digest(roots: Iterable[Path | None], suffixes: tuple[str, ...] = (".py", ".c")) -> str:
    """sha256 of every source file under ``roots`` (relative names and contents)."""
    h = hashlib.sha256()
    for root in (r for r in roots if r is not None):
        for path in sorted(p for p in root.rglob("*") if p.suffix in suffixes):
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus a hash of every source file of ``ahcq`` and the mmdet plugin: any code
    change that could change a result makes a different run."""
    return digest([ahcq.__version__, source_digest([Path(ahcq.__file__).parent, plugin_root()])])


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class RunFolder:
    """``--out`` and its staging folder for one run with ``identity`` (component -> fingerprint)."""

    out: Path
    identity: dict[str, Any]
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.identity = json.loads(json.dumps(self.identity, default=str))  # as results.json will hold it

    @property
    def staging(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"

    def _refuse(self, where: Path, differs: Iterable[str]) -> RunMismatch:
        return RunMismatch(
            f"{where} holds a run with other settings (differs: {', '.join(differs)}); use a new --out or "
            f"--overwrite to discard it")

    def finished(self) -> dict[str, Any] | None:
        """The results of an identical finished run in ``--out``, or ``None`` (raises on another run)."""
        if not self.out.exists():
            return None
        if not self.out.is_dir():
            raise RunMismatch(f"--out {self.out} exists and is not a folder")
        results = _read(self.out / RESULTS_NAME)
        if results is None:
            if any(self.out.iterdir()) and not self.overwrite:
                raise RunMismatch(f"--out {self.out} is a non-empty folder that holds no finished run; use a "
                                  f"new --out or --overwrite to replace it")
            return None
        saved = results.get("identity", {})
        differs = _differences(saved, self.identity)
        if differs and not self.overwrite:
            raise self._refuse(self.out, differs)
        return None if differs or self.overwrite else results

    def open(self) -> tuple[Path, bool]:
        """The staging folder to work in and whether it resumes an interrupted run of this identity."""
        staging = self.staging
        if staging.exists() and not staging.is_dir():
            raise RunMismatch(f"{staging} exists and is not a folder; remove it or use a new --out")
        if staging.is_dir():
            saved = (_read(staging / RUN_FILE) or {}).get("identity")
            if saved is not None and saved == self.identity and not self.overwrite:
                return staging, True
            if not self.overwrite:
                differs = _differences(saved or {}, self.identity) if saved is not None else ["unreadable"]
                raise self._refuse(staging, differs)
            _remove(staging)
        staging.mkdir(parents=True)
        write_json(staging / RUN_FILE, {"format": FORMAT, "identity": self.identity})
        return staging, False

    def commit(self, staging: Path, keep: Iterable[str] = ()) -> None:
        """Move the finished run into ``--out`` (replacing what was there only under ``--overwrite``);
        everything in the staging folder but its outputs and ``keep`` is dropped."""
        for name in ("recon_state", "progress.json", RUN_FILE):
            if name not in keep:
                _remove(staging / name)
        for other_rank in staging.glob("recon_state_rank*"):  # the other ranks' states of a torchrun run
            _remove(other_rank)
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():
            _remove(old)
            os.replace(self.out, old)
        os.replace(staging, self.out)
        _remove(old)
