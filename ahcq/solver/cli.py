"""What the two pipeline CLIs (``test_quant.py``, ``test_quant_video.py``) share: a positive-count argument
type and the entry that checks the seed, sets up logging and reports user errors."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

__all__ = ["positive", "run_cli"]


def positive(text: str) -> int:
    """``argparse`` type of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_cli(prog: str, args: argparse.Namespace, start: Callable[[argparse.Namespace], object],
            user_error: type[Exception]) -> int:
    """Run ``start(args)``; a negative ``--seed`` or a ``user_error`` exits non-zero with a one-line message
    naming the culprit."""
    if args.seed is not None and args.seed < 0:
        raise SystemExit(f"{prog}: error: --seed must be >= 0, got {args.seed}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        start(args)
    except user_error as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    return 0
