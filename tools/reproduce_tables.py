"""Reproduce the papers' tables from a small spec: every cell is a cached, resumable test_quant.py run.

    python tools/reproduce_tables.py --demo                       # the testbed grid (exp/tables/demo.yaml)
    python tools/reproduce_tables.py --spec exp/tables/coco.yaml --only coco_yolox --dry-run
    python tools/reproduce_tables.py --spec exp/tables/ablation.yaml --out runs/tables --jobs 2

A cell's folder under ``<out>/cells/<model>/`` is named by a hash of what its result depends on; a cell
whose results.json is complete is not run again, so an interrupted grid resumes where it stopped (an
interrupted cell resumes its own run). Its q_config and log sit beside it (``<cell>.yaml``, ``<cell>.log``).
The FP baseline of each model is one shared cell. A failed cell is reported and the grid goes on; the command
exits non-zero at the end, listing the failures. Tables go to ``<out>/tables.md`` and ``<out>/<table>.md``.

Where cells run (``ahcq.tables.executors``): ``--executor local`` (the default) runs them one by one in this
process with ``--jobs 1``, else as ``--jobs`` submitit jobs at once on local processes; ``--executor slurm``
submits each cell as a Slurm job through submitit (``--partition``, ``--gpus``, ``--cpus``, ``--time``),
at most ``--jobs`` queued at once, and collects results as jobs finish:

    python tools/reproduce_tables.py --spec exp/tables/coco.yaml --executor slurm --partition gpu --gpus 1 \
        --time 720 --jobs 50
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ahcq.quantization.config import ConfigError
from ahcq.tables.executors import EXECUTORS, CellJob, ClusterOptions, ExecutorError, run_jobs, run_module
from ahcq.tables.grid import Cell, Spec, SpecError, TableKind, load_spec, plan_tables
from ahcq.tables.render import cell_value, render_plan, render_registers

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "exp" / "tables" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce_tables.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", type=Path, help="table spec YAML (exp/tables/*.yaml)")
    src.add_argument("--demo", action="store_true", help=f"the testbed grid, {DEMO_SPEC.relative_to(REPO)}")
    p.add_argument("--out", type=Path, help="output folder (default: runs/tables/<spec name>)")
    p.add_argument("--only", action="append", metavar="TABLE", help="only this table (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state; write nothing")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells at once (default: 1 locally, in this process; 8 on Slurm)")
    p.add_argument("--threads", type=int, help="torch CPU threads per cell (test_quant.py --threads)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local processes (default) or Slurm jobs, through submitit")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per Slurm job")
    p.add_argument("--cpus", type=int, help="CPUs per Slurm job")
    p.add_argument("--mem-gb", type=int, help="memory per Slurm job")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit per job in minutes")
    return p


def _option(key: str, value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{key}={text}"


def cell_argv(cell: Cell, root: Path, threads: int | None) -> list[str]:
    """test_quant.py (test_quant_video.py for a video model) arguments of ``cell`` (its q_config file must
    be written first)."""
    out = cell.out_dir(root)
    argv = ["--config", str(cell.model.config), "--q_config", str(_beside(out, ".yaml")), "--out", str(out),
            "--fp-only" if cell.kind == "fp" else "--skip-fp"]
    run = cell.run
    keys: tuple[str, ...] = ("seed", "limit")
    if not cell.model.video:
        argv += ["--cache-dir", str(root / "cache")]
        argv += ["--quant-encoder"] if run.get("quant_encoder") else []
        keys += ("calib_images", "calib_max_boxes")
    for key in keys:
        if run.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(run[key])]
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--overwrite"] if out.exists() else []  # a folder without a complete result (it was lost)
    if cell.model.cfg_options:
        argv += ["--cfg-options", *(_option(k, v) for k, v in cell.model.cfg_options.items())]
    return argv


def _beside(out: Path, suffix: str) -> Path:
    """A cell's q_config (``.yaml``) and log (``.log``) sit next to its run folder (which holds the run)."""
    return out.with_name(out.name + suffix)


def is_complete(cell: Cell, root: Path) -> bool:
    """Whether the cell's results.json holds its section (fp or quant)."""
    path = cell.out_dir(root) / "results.json"
    try:
        return isinstance(json.loads(path.read_text()).get(cell.kind), dict)
    except (OSError, ValueError):
        return False


def _cli(cell: Cell) -> str:
    """The module that runs ``cell``."""
    return "ahcq.solver.test_quant_video" if cell.model.video else "ahcq.solver.test_quant"


def cell_job(cell: Cell, root: Path, threads: int | None) -> CellJob:
    """The job of one cell, its q_config written beside its run folder."""
    out = cell.out_dir(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    _beside(out, ".yaml").write_text(cell.q_config_text)
    return CellJob(cell.key, _cli(cell), cell_argv(cell, root, threads), _beside(out, ".log"))


def _checked(cell: Cell, root: Path, error: str | None) -> str | None:
    if error is None and not is_complete(cell, root):
        return "finished without a complete results.json"
    return error


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _render(spec: Spec, only: list[str] | None, root: Path, failed: dict[str, str]) -> dict[str, str]:
    plans, cells = plan_tables(spec, only)
    out = {}
    for p in plans:
        values = {k: v for k, cell in cells.items() if (v := cell_value(cell, root, p.metric)) is not None}
        out[p.name] = render_plan(p, values, set(failed))
    for t in spec.tables:
        if t.kind is TableKind.REGISTERS and (not only or t.name in only):
            out[t.name] = render_registers(t, bool(spec.run.get("quant_encoder")))
    return {t.name: out[t.name] for t in spec.tables if t.name in out}


def _run_all(todo: list[Cell], root: Path, args: argparse.Namespace) -> dict[str, str]:
    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="cells", unit="cell")
    by_key = {c.key: c for c in todo}

    def done(job: CellJob, error: str | None) -> None:
        cell = by_key[job.key]
        error = _checked(cell, root, error)
        if error is not None:
            failed[cell.key] = error
            tqdm.write(f"FAILED {cell.model.name}/{cell.slug}: {error} (log: {job.log})")
        bar.update()

    jobs = args.jobs or (8 if args.executor == "slurm" else 1)
    if args.executor == "local" and jobs == 1:
        for cell in todo:
            bar.set_postfix_str(f"{cell.model.name}/{cell.slug}")
            job = cell_job(cell, root, args.threads)
            done(job, run_module(job.module, job.argv, job.log))
    else:
        options = ClusterOptions(partition=args.partition, gpus_per_node=args.gpus, cpus_per_task=args.cpus,
                                 timeout_min=args.time, mem_gb=args.mem_gb)
        run_jobs([cell_job(c, root, args.threads) for c in todo], args.executor, root / "submitit", jobs,
                 options, done)
    bar.close()
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Plan, run the missing cells, render; 0 when every cell has a result, 1 when some failed."""
    args = _parser().parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"reproduce_tables.py: error: --jobs must be >= 1, got {args.jobs}")
    if args.executor == "local" and (args.partition or args.gpus or args.cpus or args.mem_gb):
        raise SystemExit("reproduce_tables.py: error: --partition, --gpus, --cpus and --mem-gb are Slurm "
                         "options; add --executor slurm")
    if args.time < 1:
        raise SystemExit(f"reproduce_tables.py: error: --time must be >= 1 minute, got {args.time}")
    try:
        spec = load_spec(DEMO_SPEC if args.demo else args.spec)
        known = [t.name for t in spec.tables]
        for name in args.only or []:
            if name not in known:
                raise SpecError(f"--only {name}: no such table in {spec.path}; tables: {', '.join(known)}")
        plans, cells = plan_tables(spec, args.only)
    except (SpecError, ConfigError) as err:
        raise SystemExit(f"reproduce_tables.py: error: {err}") from None
    root = args.out or Path("runs") / "tables" / spec.path.stem
    ordered = sorted(cells.values(), key=lambda c: c.kind != "fp")
    todo = [c for c in ordered if not is_complete(c, root)]
    if args.dry_run:
        for c in ordered:
            state = "pending" if c in todo else "done"
            print(f"{state:8} {c.model.name}/{c.slug:40} {c.out_dir(root)}")
        print(f"{len(ordered)} cells, {len(todo)} to run, {len(plans)} run tables")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        failed = _run_all(todo, root, args)
    except ExecutorError as err:
        raise SystemExit(f"reproduce_tables.py: error: {err}") from None
    tables = _render(spec, args.only, root, failed)
    for name, text in tables.items():
        _write(root / f"{name}.md", text)
    head = f"# {spec.title}\n\n" + (f"{spec.caption}\n\n" if spec.caption else "")
    _write(root / "tables.md", head + "\n".join(tables.values()))
    print(f"wrote {root / 'tables.md'} ({len(tables)} tables, {len(ordered)} cells, {len(todo)} run)")
    if failed:
        names = {c.key: f"{c.model.name}/{c.slug}" for c in ordered}
        print(f"{len(failed)} cell(s) failed:", file=sys.stderr)
        for key, error in failed.items():
            print(f"  {names[key]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
