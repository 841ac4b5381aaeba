"""The one way a directory of files is published: written in full beside its final name, then renamed.

Every checkpoint writer (`save_pretrained`, the training checkpoints, `convert`) goes through these, so
a crash or a full disk never leaves a half-written directory under the final name, and the previous
one stays intact until the new one is complete:

    staging = staging_path(final)          # final.parent / ".tmp-<name>", emptied first
    with removed_on_failure(staging, final):
        ... write files into staging ...
    publish(staging, final)                # fsync, rename an old `final` away, rename, delete the old

`atomic_directory(final)` does all three for a single writer. A write error (OSError, torch's
RuntimeError, safetensors' error) becomes one line, `CheckpointError: <final>: the checkpoint could not be written
(<reason>); the previous one is kept`. Names starting with `.tmp-` are leftovers to delete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

TMP_PREFIX = ".tmp-"


def staging_path(final: Path) -> Path:
    """Where `final` is written before it is published: `.tmp-<name>` beside it."""
    return final.parent / f"{TMP_PREFIX}{final.name}"


def fresh_staging(final: Path) -> Path:
    """`staging_path(final)`, created empty (a leftover of a killed writer is removed first)."""
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


@contextmanager
def removed_on_failure(staging: Path, final: Path) -> Iterator[None]:
    """Delete the half-written `staging` when writing fails; a write error (disk full, ...) becomes one
    line. torch.save reports a failed write as RuntimeError, safetensors as SafetensorError."""
    from safetensors import SafetensorError

    try:
        yield
    except CheckpointError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = " ".join(str(error).split())
        raise CheckpointError(
            f"{final}: the checkpoint could not be written ({reason}); the previous one is kept"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def retire(path: Path) -> Path:
    """Rename `path` to a `.tmp-delete-*` name (atomic), so that no partly deleted directory is ever
    visible under its name; the caller deletes the returned path."""
    retired = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    if retired.exists():  # left by a writer killed while deleting
        shutil.rmtree(retired)
    os.replace(path, retired)
    return retired


def publish(staging: Path, final: Path) -> None:
    """Make the complete `staging` directory `final`: fsync it, rename an existing `final` away, rename
    `staging` to `final`, fsync the parent, delete the old one last."""
    with removed_on_failure(staging, final):
        _fsync_tree(staging)
    replaced = retire(final) if final.exists() else None
    os.replace(staging, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; when the block completes it becomes `final` (`publish`), when it
    fails it is deleted and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(final)
    with removed_on_failure(staging, final):
        yield staging
    publish(staging, final)
