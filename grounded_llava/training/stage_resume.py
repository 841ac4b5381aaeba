"""Where a resumed stage picks up: before its setup (an end-of-stage checkpoint) or after it (mid-stage).

A checkpoint written at the end of stage i (`stage_index` i+1, `stage_step` 0) holds the RNG state the
uninterrupted run carries into stage i+1's setup, which draws from it (the new class rows of
`add_categories`, ...): that state is restored before the setup. A mid-stage checkpoint holds the
state at a step inside the loop: the stage is set up first (its new rows are then overwritten by the
checkpoint's weights), then the optimizer, scheduler, sampler and RNG state are restored. The weights
themselves are stored once, in the checkpoint's `model/`, which `resume.resume_checkpoint` loaded: on a
mid-stage resume the setup leaves them as they are (the stage's new categories are already in the model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpointing import load_training_state, read_trainer_state
from .sampler import ResumableSampler


def restore_before_setup(checkpoint: Path, process_index: int) -> bool:
    """Restore the RNG state of an end-of-stage `checkpoint` now; True when `checkpoint` is mid-stage
    instead (nothing restored: `restore_after_setup` then loads it)."""
    if read_trainer_state(checkpoint)["extra"]["stage_step"] > 0:
        return True
    load_training_state(checkpoint, process_index=process_index)  # RNG only
    return False


def restore_after_setup(
    checkpoint: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: ResumableSampler,
    process_index: int,
) -> int:
    """Load a mid-stage `checkpoint`'s optimizer, scheduler, sampler and this rank's RNGs into the set-up
    stage; returns its stage step."""
    restored = load_training_state(
        checkpoint, optimizer=optimizer, scheduler=scheduler, process_index=process_index
    )
    sampler.load_state_dict(restored.sampler_state)
    return int(restored.extra["stage_step"])
