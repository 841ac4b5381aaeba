"""How loud a command line is: `--quiet` (answers and errors only), the default (our own progress bars
too), `--verbose` (also transformers' info logs and its weight-loading bars)."""

from __future__ import annotations

import argparse
import logging

_progress = {"shown": True}


def progress_shown() -> bool:
    """Whether progress bars show (`disable=not progress_shown()`): False after `--quiet`."""
    return _progress["shown"]


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    """`--quiet` / `--verbose`, mutually exclusive."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet", action="store_true", help="no progress bars or logs: answers and errors only"
    )
    group.add_argument("--verbose", action="store_true", help="also transformers' info logs and loading bars")


def apply_verbosity(args: argparse.Namespace) -> None:
    """Set the loggers and bars for `args.quiet` / `args.verbose` (imports transformers' logging module)."""
    from transformers.utils import logging as transformers_logging

    _progress["shown"] = not args.quiet
    level = logging.INFO if args.verbose else logging.WARNING if not args.quiet else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.set_verbosity(level)
    if not args.verbose:
        transformers_logging.disable_progress_bar()
