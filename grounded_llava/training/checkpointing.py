"""Atomic, resumable training checkpoints for any `nn.Module` + optimizer + LR scheduler.

Layout of `checkpoints_dir/step-000123/`:
    trainable.safetensors   trainable parameters (and the buffers of modules that own one, e.g. the
                            running statistics of a trained BatchNorm), CPU tensors; absent when
                            `write_files` saves the model itself (the trainer's `model/`: weights once)
    optimizer.pt            `optimizer.state_dict()` (torch.save; loaded with `weights_only=True`)
    scheduler.pt            `scheduler.state_dict()` (same)
    rng_state_<rank>.pt     python `random`, numpy, torch CPU (and CUDA) RNG states of every rank
    trainer_state.json      format_version, step, number of processes, sampler position, `extra`
    ...                     whatever `write_files(tmp_dir)` adds (e.g. a peft adapter, a config)

Crash safety (`atomic_dir.py`): everything is written into `checkpoints_dir/.tmp-step-000123`, every
file and the directory are fsync'ed, and only then is the directory renamed to `step-000123`.
A failed write (disk full, ...) deletes the temporary directory and raises a one-line
`CheckpointError`; the published checkpoints are untouched. Damaged files raise one-line
`CheckpointError`s naming them when loaded; `resume.py` then falls back to the previous checkpoint.
Older checkpoints are pruned after that, each renamed to a `.tmp-*` name before it is deleted, so
a `step-*` directory is always complete and the newest good one is never removed. `.tmp-*`
leftovers of a killed run are ignored and removed by `find_latest_checkpoint`. A model or optimizer
state holding NaN/inf is refused (`NonFiniteError`) before anything is written or pruned.

Distributed use: every rank calls `save_training_state(..., accelerator=accelerator)` (it
synchronises with `wait_for_everyone`); rank 0 writes the shared files and each rank its RNG state.
Pass the unwrapped model (`accelerator.unwrap_model`). Multi-node runs need a shared filesystem.
Sharded optimizers (FSDP, DeepSpeed ZeRO) keep their state per rank and would need accelerate's own
`save_state`; this module covers single-process and DDP training, and the trainer refuses the
sharded set-ups up front (`distribution.py`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic_dir import TMP_PREFIX, fresh_staging, publish, removed_on_failure, retire, staging_path
from ..modeling.state_files import CheckpointError, check_shapes, read_safetensors
from .nonfinite import check_finite, optimizer_tensors
from .rng_state import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from accelerate import Accelerator

FORMAT_VERSION = 1
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    """What `load_training_state` restored besides the objects it was given."""

    path: Path
    step: int
    sampler_state: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


# ---------------------------------------------------------------------------------------------- model


def trainable_state_dict_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters that require grad, plus the persistent buffers of the
    modules owning such a parameter (a trained BatchNorm's running statistics change with training too)."""
    keys = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            keys += [prefix + name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
            keys += [prefix + name for name, _ in module.named_buffers(recurse=False)]
    persistent = model.state_dict(keep_vars=True).keys()
    return sorted(key for key in keys if key in persistent)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors named by `trainable_state_dict_keys` (what a checkpoint saves)."""
    full = model.state_dict()
    return {
        key: full[key].detach().to("cpu", copy=True).contiguous() for key in trainable_state_dict_keys(model)
    }


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy `state` into `model`; every tensor must exist in the model and every trainable one be given.

    `source` names where `state` comes from, for the error messages (`CheckpointError`).
    """
    expected = set(trainable_state_dict_keys(model))
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: lacks trainable tensors of the model: {missing[:10]} ({len(missing)} in all)"
        )
    check_shapes(model, state, Path(source))
    result = model.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{source}: holds tensors the model does not have: {sorted(result.unexpected_keys)[:10]}"
        )


# --------------------------------------------------------------------------------------------- files


def load_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True)`; a refused pickle or a damaged file is a one-line error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects beyond tensors and plain data, which are never "
            "unpickled (not written by grounded_llava, or altered)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path}: cannot be read (truncated or corrupt?): {reason}") from None


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every published `step-*` directory, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint, after checking its `format_version`."""
    path = Path(checkpoint) / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, {checkpoint} is not a training checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt?): {error}") from None
    found = state.get("format_version") if isinstance(state, dict) else None
    if found != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {found!r} does not match the version this code reads ({FORMAT_VERSION}); "
            "resume with the version of grounded_llava that wrote it"
        )
    return state


def find_latest_checkpoint(checkpoints_dir: str | Path, *, cleanup: bool = True) -> Path | None:
    """Newest complete `step-*` checkpoint, or None. With `cleanup`, `.tmp-*` leftovers are deleted
    (in a distributed run pass `cleanup=accelerator.is_main_process`, before anyone saves)."""
    root = Path(checkpoints_dir)
    if cleanup and root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for _, path in reversed(list_checkpoints(root)):
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        warnings.warn(f"{path}: has no {TRAINER_STATE_FILE}, skipped", stacklevel=2)
    return None


# ---------------------------------------------------------------------------------------- save / load


def save_training_state(
    checkpoints_dir: str | Path,
    *,
    step: int,
    model_state: Mapping[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    sampler_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    write_files: Callable[[Path], None] | None = None,
    accelerator: Accelerator | None = None,
) -> Path:
    """Write `checkpoints_dir/step-<step>` atomically and keep only the newest `keep_last` ones.

    Args:
        model_state: tensors to save, usually `trainable_state_dict(unwrapped_model)`; None when
            `write_files` writes the model's weights itself (the trainer's `model/`), so that a
            checkpoint stores them once (the caller then checks them for NaN/inf).
        sampler_state: JSON-serialisable data position (`ResumableSampler.state_dict()`).
        extra: JSON-serialisable values returned by `load_training_state` (stage name, metrics, ...).
        keep_last: number of checkpoints kept after this one is published; None keeps all.
        write_files: called on rank 0 with the temporary directory to add files (e.g. `save_pretrained`).
        accelerator: in a multi-process run; every rank must call this function.
    Returns the published directory. Raises `NonFiniteError` (nothing written, nothing pruned) when
    `model_state` or the optimizer's state holds NaN/inf.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    num_processes = 1 if accelerator is None else accelerator.num_processes
    root = Path(checkpoints_dir)
    final = root / checkpoint_name(step)
    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "num_processes": num_processes,
        "time": time.time(),
        "sampler": None if sampler_state is None else dict(sampler_state),
        "extra": dict(extra or {}),
    }
    try:  # fail before touching the disk
        trainer_state_text = json.dumps(trainer_state, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"sampler_state / extra of step {step} must be JSON-serialisable: {error}") from error
    optimizer_state = optimizer.state_dict()
    if model_state is not None:
        check_finite(model_state, where=str(final), what="model")
    check_finite(optimizer_tensors(optimizer_state), where=str(final), what="optimizer state")

    if is_main:
        fresh_staging(final)
    staging = staging_path(final)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    with removed_on_failure(staging, final):
        torch.save(capture_rng_state(), staging / _rng_file(rank))
        if is_main:
            if model_state is not None:
                save_file(
                    dict(model_state), staging / TRAINABLE_FILE, metadata={"format": "pt", "step": str(step)}
                )
            torch.save(optimizer_state, staging / OPTIMIZER_FILE)
            if scheduler is not None:
                torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
            if write_files is not None:
                write_files(staging)
            (staging / TRAINER_STATE_FILE).write_text(trainer_state_text, encoding="utf-8")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        publish(staging, final)  # re-saving a step (after a resume): the old copy is deleted last
        if keep_last is not None:
            for _, old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(retire(old))
    return final


def load_training_state(
    checkpoint: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    process_index: int = 0,
    restore_rng: bool = True,
) -> TrainingState:
    """Restore what `save_training_state` wrote into the given objects (and the RNGs of this rank).

    `model` is the unwrapped module whose trainable tensors were saved. When this rank has no
    saved RNG state (resumed on more processes), its RNGs are left as they are, with a warning.
    """
    path = Path(checkpoint)
    state = read_trainer_state(path)
    if model is not None:
        trainable = read_safetensors(path / TRAINABLE_FILE)
        load_trainable_state_dict(model, trainable, source=str(path / TRAINABLE_FILE))
    if optimizer is not None:
        optimizer.load_state_dict(load_torch_file(path / OPTIMIZER_FILE))
    if scheduler is not None:
        if not (path / SCHEDULER_FILE).is_file():
            raise FileNotFoundError(
                f"{path / SCHEDULER_FILE}: missing, the checkpoint was saved without a scheduler"
            )
        scheduler.load_state_dict(load_torch_file(path / SCHEDULER_FILE))
    rng_path = path / _rng_file(process_index)
    if restore_rng and rng_path.is_file():
        restore_rng_state(load_torch_file(rng_path))
    elif restore_rng:
        warnings.warn(
            f"{rng_path}: missing (saved by {state['num_processes']} processes), RNG state not restored",
            stacklevel=2,
        )
    return TrainingState(
        path=path, step=int(state["step"]), sampler_state=state["sampler"], extra=state["extra"]
    )


def write_replica_digest(model: nn.Module, directory: Path, process_index: int) -> None:
    """Each rank writes a SHA-256 of its weights to `directory/rank-<i>.sha256`: equal files = consistent DDP."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{process_index}.sha256").write_text(digest.hexdigest() + "\n")
