"""Fixtures of the tools' tests."""
from __future__ import annotations

import os

import pytest
from tool_loader import load_tool


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private single-node Slurm (tools/local_slurm.py) for the session's tests."""
    local_slurm = load_tool("local_slurm")
    if local_slurm.missing_programs() or os.geteuid() != 0:
        pytest.skip("needs Debian's slurmctld, slurmd, slurm-client and munge, as root (environment.sh)")
    root = tmp_path_factory.mktemp("slurm")
    env = local_slurm.start(root)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield root
    local_slurm.stop(root)
