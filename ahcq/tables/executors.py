"""Where a grid's cells run: one by one in this process, or as submitit jobs on local processes or on a
Slurm cluster, at most ``jobs`` at once, results collected as jobs finish.

A job runs one cell's CLI (``test_quant`` or ``test_quant_video``) in its own Python process, its output
going to the cell's log; the job function is imported by reference, so the job's interpreter needs the
package installed (the repository's ``.venv`` on the nodes of a shared file system). submitit keeps each
job's pickled call, stdout and stderr under ``<out>/submitit``. Slurm jobs that were queued when the driver
stopped are found again from ``<out>/submitit/jobs.json`` and waited for instead of submitted twice.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

__all__ = ["EXECUTORS", "CellJob", "ClusterOptions", "ExecutorError", "run_jobs", "run_module"]

EXECUTORS = ("local", "slurm")
POLL_S = 1.0


class ExecutorError(RuntimeError):
    """The chosen executor cannot run here (e.g. Slurm asked for on a machine without it)."""


def run_module(module: str, argv: list[str], log: str | Path) -> str | None:
    """Run ``module.main(argv)`` here with its output in ``log``; None on success, else a one-line reason
    (a traceback goes to the log: a broken cell must not stop the grid)."""
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            importlib.import_module(module).main(argv)
        except SystemExit as err:
            return None if err.code in (0, None) else str(err.code)
        except Exception as err:  # noqa: BLE001 - reported per cell, the traceback in its log
            traceback.print_exc(file=f)
            return f"{type(err).__name__}: {err}"
    return None


@dataclass(frozen=True)
class CellJob:
    """One cell to run: its key (for bookkeeping), its CLI module and arguments, its log."""

    key: str
    module: str
    argv: list[str]
    log: Path


@dataclass(frozen=True)
class ClusterOptions:
    """What a job asks of the scheduler (Slurm reads all of it; local processes only the time limit)."""

    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    timeout_min: int = 24 * 60
    mem_gb: int | None = None


def _executor(kind: str, folder: Path, options: ClusterOptions) -> submitit.Executor:
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as err:  # submitit's check for the scheduler's programs
        raise ExecutorError(f"--executor {kind}: {err}") from None
    params: dict[str, Any] = {"timeout_min": options.timeout_min, "name": "ahcq-cell"}
    if kind == "slurm":
        params.update(slurm_partition=options.partition, gpus_per_node=options.gpus_per_node)
        if options.cpus_per_task:
            params["cpus_per_task"] = options.cpus_per_task
        if options.mem_gb:
            params["mem_gb"] = options.mem_gb
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _result(job: submitit.Job) -> str | None:
    try:
        return job.result()
    except Exception as err:  # noqa: BLE001 - the job died (killed, timed out, node lost): one line
        lines = str(err).strip().splitlines()
        return f"job {job.job_id} failed: {lines[-1] if lines else type(err).__name__}"


def _queued(job_ids: Iterable[str]) -> set[str]:
    """Which of the Slurm ``job_ids`` are still in the queue (pending or running), asked of ``squeue``:
    submitit asks ``sacct``, which needs the accounting database many small clusters do without."""
    ids = list(job_ids)
    if not ids:
        return set()
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True,
                         check=False)
    return set(out.stdout.split()) if out.returncode == 0 else set()


def _vanished(job: submitit.Job) -> str:
    """The reason of a Slurm job that left the queue without a result, with the end of its stderr."""
    try:
        lines = [ln for ln in job.paths.stderr.read_text().splitlines() if ln.strip()]
    except OSError:
        lines = []
    tail = f": {lines[-1].strip()}" if lines else ""
    return (f"job {job.job_id} left the Slurm queue without a result (killed, out of time or its node "
            f"lost){tail}")


class _Ledger:
    """Slurm job ids by cell key (``jobs.json``), so a restarted driver waits for jobs still queued."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "jobs.json"
        try:
            self.ids: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.ids = {}

    def record(self, key: str, job_id: str) -> None:
        self.ids[key] = job_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1))
        tmp.replace(self.path)

    def queued(self, key: str, folder: Path) -> submitit.Job | None:
        job_id = self.ids.get(key)
        if job_id is None or job_id not in _queued([job_id]):
            return None
        return submitit.SlurmJob(folder=folder, job_id=job_id)


def run_jobs(cells: Iterable[CellJob], kind: str, folder: Path, jobs: int, options: ClusterOptions,
             on_done: Callable[[CellJob, str | None], None]) -> None:
    """Run every cell as a submitit job of ``kind``, at most ``jobs`` unfinished at once, calling
    ``on_done(cell, error)`` as each one finishes. Interrupting the driver cancels its local jobs; Slurm jobs
    stay queued and are waited for by the next driver."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    executor = _executor(kind, folder, options)
    ledger = _Ledger(folder) if kind == "slurm" else None
    waiting = list(cells)
    running: list[tuple[CellJob, submitit.Job]] = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                cell = waiting.pop(0)
                job = ledger.queued(cell.key, folder) if ledger else None
                if job is None:
                    job = executor.submit(run_module, cell.module, cell.argv, str(cell.log))
                    if ledger:
                        ledger.record(cell.key, job.job_id)
                running.append((cell, job))
            queued = _queued(j.job_id for _, j in running) if ledger else set()
            done = []
            for cell, job in running:
                if job.done():
                    done.append((cell, job, None))
                elif ledger and job.job_id not in queued and not job.paths.result_pickle.exists():
                    done.append((cell, job, _vanished(job)))
            for cell, job, lost in done:
                running.remove((cell, job))
                on_done(cell, lost or _result(job))
            if not done:
                time.sleep(POLL_S)
    except BaseException:
        if kind == "local":
            for _, job in running:
                job.cancel(check=False)
        raise
