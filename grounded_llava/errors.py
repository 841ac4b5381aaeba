"""Errors a user's input causes, and the one way the command lines report them (no torch import here).

The command lines (`train.py`, `infer.py`, `python -m grounded_llava.evaluate`) import this module before
anything heavy, so `--help` and argument mistakes answer before the model stack loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """What the user's input caused (a file, a field, an option), with a message that names it: the
    command lines print it as one line and exit 2. Every such error derives from it (a config, data, a
    checkpoint, an image, an upload, an option); anything else is a bug and keeps its traceback."""


class UsageError(UserError, ValueError):
    """A command-line option or argument that cannot be used (`--conf 2`, `--tasks nope`)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is incomplete, corrupt or from another format version."""


class BaseModelUnavailableError(UserError, RuntimeError):
    """The base LLaVA weights cannot be loaded (offline hub id, missing directory)."""


def exit_on_user_error(prog: str, action: Callable[[], int]) -> int:
    """`action()`'s exit code, or 2 after one line `prog: error: message` on stderr for a `UserError` or a
    missing file: no traceback for a mistake in the input."""
    try:
        return action()
    except (FileNotFoundError, UserError) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
