"""Cells as submitit jobs (``ahcq.tables.executors``): local processes really run apart, at most ``jobs`` at
once, each with its own log; failures and dead jobs come back as one-line reasons; Slurm without Slurm is
refused by name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import submitit

from ahcq.tables.executors import CellJob, ClusterOptions, ExecutorError, run_jobs, run_module

PROBE_DIR = Path(__file__).resolve().parent


def _cells(tmp: Path, plan: list[tuple[float, str]]) -> list[CellJob]:
    return [CellJob(f"cell{i}", "cell_probe", [str(tmp / f"rec{i}.json"), str(sec), code],
                    tmp / f"cell{i}.log") for i, (sec, code) in enumerate(plan)]


def test_local_jobs_run_in_their_own_processes_at_most_jobs_at_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PROBE_DIR), os.environ.get("PYTHONPATH", "")]))
    cells = _cells(tmp_path, [(1.5, "0"), (1.5, "0"), (1.5, "3"), (0.0, "kill")])
    results: dict[str, str | None] = {}
    run_jobs(cells, "local", tmp_path / "submitit", 2, ClusterOptions(timeout_min=5),
             lambda cell, error: results.__setitem__(cell.key, error))
    assert set(results) == {"cell0", "cell1", "cell2", "cell3"}
    assert results["cell0"] is None and results["cell1"] is None
    assert results["cell2"] == "3"
    assert results["cell3"] is not None and results["cell3"].startswith("job ")
    runs = [json.loads((tmp_path / f"rec{i}.json").read_text()) for i in range(4)]
    assert len({r["pid"] for r in runs}) == 4 and os.getpid() not in {r["pid"] for r in runs}
    for r in runs:  # never more than 2 cells at once
        assert sum(o["start"] < r["end"] and r["start"] < o["end"] for o in runs) <= 2
    assert "probe rec0.json done" in (tmp_path / "cell0.log").read_text()


def test_slurm_without_slurm_is_refused_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, sbatch or squeue on it
    with pytest.raises(ExecutorError, match="--executor slurm: .*srun"):
        run_jobs(_cells(tmp_path, [(0, "0")]), "slurm", tmp_path / "submitit", 1, ClusterOptions(),
                 lambda cell, error: None)


def test_slurm_jobs_report_success_failure_and_death(slurm, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PROBE_DIR), os.environ.get("PYTHONPATH", "")]))
    cells = _cells(tmp_path, [(0.5, "0"), (0.5, "4"), (0.0, "kill")])
    results: dict[str, str | None] = {}
    folder = tmp_path / "submitit"
    run_jobs(cells, "slurm", folder, 2, ClusterOptions(partition="ahcq", cpus_per_task=1, timeout_min=5),
             lambda cell, error: results.__setitem__(cell.key, error))
    assert results["cell0"] is None and results["cell1"] == "4"
    assert "left the Slurm queue without a result" in results["cell2"]
    ids = json.loads((folder / "jobs.json").read_text())
    assert sorted(ids) == ["cell0", "cell1", "cell2"] and len(set(ids.values())) == 3
    runs = [json.loads((tmp_path / f"rec{i}.json").read_text()) for i in range(3)]
    assert os.getpid() not in {r["pid"] for r in runs}


def test_a_restarted_driver_waits_for_its_queued_slurm_job_instead_of_submitting_again(slurm, tmp_path,
                                                                                      monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PROBE_DIR), os.environ.get("PYTHONPATH", "")]))
    folder = tmp_path / "submitit"
    cells = _cells(tmp_path, [(3.0, "0")])
    first = submitit.AutoExecutor(folder=folder, cluster="slurm")
    first.update_parameters(slurm_partition="ahcq", timeout_min=5)
    job = first.submit(run_module, cells[0].module, cells[0].argv, str(cells[0].log))
    (folder / "jobs.json").write_text(json.dumps({"cell0": job.job_id}))  # as a driver that then died
    results: dict[str, str | None] = {}
    run_jobs(cells, "slurm", folder, 1, ClusterOptions(partition="ahcq", timeout_min=5),
             lambda cell, error: results.__setitem__(cell.key, error))
    assert results == {"cell0": None}
    assert json.loads((folder / "jobs.json").read_text()) == {"cell0": job.job_id}
    assert sorted(p.name for p in folder.glob("*_submission.sh")) == [f"{job.job_id}_submission.sh"]
