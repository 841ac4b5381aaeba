"""Reading weight files with one-line errors that name the file (no traceback, no torch wording).

Every reader of a checkpoint (the model's `from_pretrained`, the training resume) goes through these:
- `verify_safetensors` opens every `*.safetensors` under a directory before anything loads, so a
  truncated or garbage file is reported by name instead of failing deep inside transformers or peft;
- `read_safetensors` loads one file;
- `check_shapes` compares a state dict with the model it is loaded into, so a file for another
  set of categories says so instead of PyTorch's multi-line `size mismatch` error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    reason = " ".join(str(error).split())
    return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {reason}")


def verify_safetensors(directory: Path) -> None:
    """Open (header and size check, no tensor read) every `*.safetensors` file under `directory`."""
    for path in sorted(Path(directory).rglob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise _unreadable(path, error) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (CPU); `CheckpointError` naming it when it cannot be read."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None


def check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise `CheckpointError` when a tensor of `state` has another shape than the model's tensor."""
    own = model.state_dict()
    differ = [key for key, tensor in state.items() if key in own and own[key].shape != tensor.shape]
    if differ:
        key = differ[0]
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(state[key].shape)} but the model's is {tuple(own[key].shape)} "
            f"({len(differ)} tensors differ; saved for another set of categories or another model?)"
        )
