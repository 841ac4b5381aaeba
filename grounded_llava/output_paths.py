"""Checks on where the CLIs write, run before any model loads: no output may overwrite an input (or
another output), a directory option must not name a file, and a file option must not name a directory.

Paths are compared after resolving symlinks and `..`, so `--out .` next to `--image ./x.png` is caught.
Every check raises ValueError with one line naming the option and the path (the CLIs exit 2 on it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from grounded_llava.errors import UsageError


def _same_file_key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def check_directory_option(path: Path, option: str) -> None:
    """`path` may be missing (it will be created) but neither it nor an ancestor may be an existing file."""
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "" if ancestor == path else f": {ancestor}"
                raise UsageError(f"{option} {path}{where} is a file, not a directory")
            return


def check_file_option(path: Path, option: str) -> None:
    """`path` may be missing or a file, not a directory; its folder follows `check_directory_option`."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory, not a file")
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(f"{option} {path}: {ancestor} is a file, not a directory")
            return


def refuse_overwrites(outputs: Iterable[tuple[Path, str]], inputs: Iterable[tuple[Path, str]]) -> None:
    """Raise when an output path is an input path or an earlier output path.

    Args:
        outputs: (path, label) of every file to be written, e.g. `(out/1.png, "output")`.
        inputs: (path, label) of every file read, e.g. `(images/1.png, "the input image")`.
    """
    taken = {_same_file_key(path): (label, path) for path, label in inputs}
    for path, label in outputs:
        key = _same_file_key(path)
        if key in taken:
            other_label, other = taken[key]
            raise UsageError(f"{label} {path} would overwrite {other_label} {other}")
        taken[key] = (label, path)
