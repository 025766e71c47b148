"""A private single-node Slurm on this machine (Debian's slurmctld, slurmd, slurm-client and munge, as root),
to try ``tools/reproduce_tables.py --executor slurm`` without a cluster; the Slurm tests start one the same
way.

    python tools/local_slurm.py start --dir /tmp/ahcq-slurm    # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/ahcq-slurm/slurm.conf python tools/reproduce_tables.py --demo --executor slurm \\
        --partition ahcq --jobs 2
    python tools/local_slurm.py stop --dir /tmp/ahcq-slurm

Everything (config, state, logs, its own munge daemon and socket) lives under ``--dir``, on free ports, so it
does not touch a Slurm or munge the machine already runs. No accounting database: ``sacct`` fails, which is
why ``ahcq.tables.executors`` watches jobs through ``squeue``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "srun")
PARTITION = "ahcq"
KEY = Path("/etc/munge/munge.key")


def missing_programs() -> list[str]:
    """The Slurm / munge programs this machine lacks (``environment.sh`` installs them)."""
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=ahcq-local",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def start(root: Path, cpus: int | None = None, timeout_s: float = 30.0) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under ``root``; the environment (``SLURM_CONF``) clients need.
    Raises ``RuntimeError`` naming what is missing or what did not come up."""
    missing = missing_programs()
    if missing:
        raise RuntimeError(f"no Slurm here: missing {', '.join(missing)} (Debian: slurmctld slurmd "
                           "slurm-client munge)")
    if os.geteuid() != 0:
        raise RuntimeError("a private Slurm runs its daemons as root")
    if not KEY.is_file():
        raise RuntimeError(f"no munge key {KEY} (the munge package creates it)")
    root = root.resolve()
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, cpus or os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run([_sbin("munged"), "--force", f"--socket={root / 'munge.socket'}",
                    f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                    f"--seed-file={root / 'munged.seed'}", f"--key-file={KEY}"], check=True, env=env)
    subprocess.run([_sbin("slurmctld"), "-c"], check=True, env=env)
    subprocess.run([_sbin("slurmd"), "-c"], check=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env,
                             check=False)
        if out.stdout.strip() == "idle":
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    stop(root)
    raise RuntimeError(f"the private Slurm under {root} did not come up in {timeout_s:.0f} s "
                       f"(logs: {root / 'slurmctld.log'}, {root / 'slurmd.log'})")


def stop(root: Path, timeout_s: float = 15.0) -> None:
    """Cancel every job of the private Slurm under ``root``, wait for them to leave the queue (a job step
    cut off from its controller would hang), then stop the daemons (missing ones are skipped)."""
    env = {**os.environ, "SLURM_CONF": str(root.resolve() / "slurm.conf")}
    if (root / "slurm.conf").is_file():
        subprocess.run(["scancel", "--full", "--signal=KILL", f"--user={os.geteuid()}"], env=env,
                       capture_output=True, check=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = root / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            continue
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local_slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", type=Path, required=True, help="where the private Slurm keeps everything")
    p.add_argument("--cpus", type=int, help="CPUs of the node (default: this machine's)")
    args = p.parse_args(argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    try:
        env = start(args.dir, args.cpus)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"local_slurm.py: error: {err}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={env['SLURM_CONF']}  # partition {PARTITION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
