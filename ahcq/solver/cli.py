"""What the two pipeline CLIs (``test_quant.py``, ``test_quant_video.py``) share: the user-error and
interrupt exceptions, a positive-count argument type, the third-party notice filter (``noise``), and the
entry that checks the seed, sets up logging and turns user errors and interrupts into one line and a
non-zero exit."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ahcq.solver.noise import quiet_third_party

__all__ = ["Interrupted", "UserError", "add_run_arguments", "positive", "quiet_third_party", "run_cli"]


class UserError(Exception):
    """Bad input from the user (missing file, bad config or option); reported without a traceback."""


class Interrupted(Exception):
    """The run was interrupted (SIGINT); the message says how to resume it."""


def positive(text: str) -> int:
    """``argparse`` type of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options both CLIs take for where and how a run goes: --out and its protocol, seed, device,
    threads and the reconstruction length."""
    p.add_argument("--out", type=Path,
                   help="results folder (default: runs/<config>__<q_config>); a rerun into a folder that "
                        "holds another run is refused, an interrupted run of the same inputs resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (and discard an interrupted run's state)")
    p.add_argument("--keep-state", action="store_true",
                   help="keep the reconstruction state (recon_state/) in --out after the run")
    p.add_argument("--seed", type=int, help="seed of the run (default: the q_config's seed, else 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive,
                   help="CPU threads for torch (default: torch's). Float sums are split by thread, so the "
                        "numbers depend on it; it is part of the run's fingerprint and recorded in results")
    p.add_argument("--recon-iters", type=positive,
                   help="reconstruction iterations per unit, overriding the q_config (smoke tests)")


def _log_to_stderr() -> None:
    """INFO lines of ``ahcq`` on stderr, through a handler of its own: mmcv turns the root logger's stream
    handlers down to ERROR when it builds its loggers, which would silence a root-level setup."""
    log = logging.getLogger("ahcq")
    for old in [h for h in log.handlers if getattr(h, "ahcq_cli", False)]:
        log.removeHandler(old)  # an earlier run in this process (a grid's cell) wrote to a stderr now closed
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.ahcq_cli = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_cli(prog: str, args: argparse.Namespace, start: Callable[[argparse.Namespace], object]) -> int:
    """Run ``start(args)``; a negative ``--seed``, a ``UserError`` or an interrupt exits non-zero with one
    line (130 for an interrupt, with how to resume)."""
    if args.seed is not None and args.seed < 0:
        raise SystemExit(f"{prog}: error: --seed must be >= 0, got {args.seed}")
    _log_to_stderr()
    try:
        start(args)
    except UserError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    except Interrupted as err:
        print(f"{prog}: {err}", flush=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", flush=True)
        raise SystemExit(130) from None
    return 0
