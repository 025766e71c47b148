"""The CLI's log lines follow the stderr of the run that is going on (a table grid runs cells in-process,
each with its stderr redirected to the cell's log)."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging

from ahcq.solver.cli import run_cli


def _logs(message: str) -> None:
    logging.getLogger("ahcq.solver.test_cli_logging").info(message)


def test_each_run_logs_to_its_own_stderr_even_after_the_first_ones_closed(tmp_path):
    second = io.StringIO()
    args = argparse.Namespace(seed=None)
    with open(tmp_path / "first.log", "w") as first, contextlib.redirect_stderr(first):
        run_cli("prog", args, lambda _: _logs("first cell"))
    with contextlib.redirect_stderr(second):
        run_cli("prog", args, lambda _: _logs("second cell"))
    assert (tmp_path / "first.log").read_text() == "INFO ahcq.solver.test_cli_logging: first cell\n"
    assert second.getvalue() == "INFO ahcq.solver.test_cli_logging: second cell\n"
    handlers = [h for h in logging.getLogger("ahcq").handlers if getattr(h, "ahcq_cli", False)]
    assert len(handlers) == 1
