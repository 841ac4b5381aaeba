"""Where a run resumes: the newest checkpoint that loads, falling back past damaged ones.

A checkpoint can be damaged after it was published (a disk error, a copy cut short, a file edited
by hand). Resuming checks every file of the newest checkpoint (trainer state, every safetensors
file, every torch pickle) and loads its model; when that fails with a `CheckpointError` (or a
missing file), the next older checkpoint is tried, with a warning naming the damaged one and why;
the damaged one is renamed `unusable-step-*` so that pruning never keeps it in place of good ones.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..modeling import GroundedLlavaForConditionalGeneration
from ..modeling.state_files import CheckpointError, verify_safetensors
from .checkpointing import find_latest_checkpoint, list_checkpoints, load_torch_file, read_trainer_state

UNUSABLE_PREFIX = "unusable-"
logger = logging.getLogger(__name__)


def _set_aside(path: Path) -> None:
    """Rename a damaged checkpoint to `unusable-step-*`: kept for inspection, but no longer a `step-*`
    that `keep_last` would count (and keep, pruning the good ones) or a later resume would try."""
    target = path.with_name(f"{UNUSABLE_PREFIX}{path.name}")
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)


def verify_checkpoint(path: Path) -> None:
    """Read every file of a training checkpoint once; `CheckpointError` naming the first damaged one."""
    read_trainer_state(path)
    verify_safetensors(path)
    for pickled in sorted(path.glob("*.pt")):
        load_torch_file(pickled)


def resume_checkpoint(
    checkpoints_dir: Path, *, cleanup: bool
) -> tuple[Path, GroundedLlavaForConditionalGeneration, dict[str, Any]] | None:
    """(path, model, trainer state) of the newest checkpoint that verifies and loads; None when there is none.

    `cleanup` removes leftovers of interrupted saves first (`find_latest_checkpoint`). Raises
    `CheckpointError` when checkpoints exist but none is usable (rather than silently starting over).
    """
    find_latest_checkpoint(checkpoints_dir, cleanup=cleanup)
    found = list_checkpoints(checkpoints_dir)
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
            model = GroundedLlavaForConditionalGeneration.from_pretrained(path / "model", is_trainable=True)
            return path, model, read_trainer_state(path)
        except (CheckpointError, FileNotFoundError) as error:
            logger.warning("resume: %s is unusable, falling back to the previous checkpoint: %s", path, error)
            if cleanup:
                _set_aside(path)
    if found:
        raise CheckpointError(f"{checkpoints_dir}: none of the {len(found)} checkpoints can be loaded")
    return None
