"""Errors a user's input causes, and the one way the command lines report them (no torch import here).

The command lines (`train.py`, `infer.py`, `python -m grounded_llava.evaluate`) import this module before
anything heavy, so `--help` and argument mistakes answer before the model stack loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupt or from another format version."""


class BaseModelUnavailableError(RuntimeError):
    """The base LLaVA weights cannot be loaded (offline hub id, missing directory)."""


def exit_on_user_error(prog: str, action: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """`action()`'s exit code, or 2 after one line `prog: error: message` on stderr for one of `errors`
    (or a missing file, a bad checkpoint or base model): no traceback for a mistake in the input."""
    try:
        return action()
    except (FileNotFoundError, CheckpointError, BaseModelUnavailableError, *errors) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
