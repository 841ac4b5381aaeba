"""A checkpoint directory's tensors, by the names they were saved under.

safetensors are preferred; pickled `.bin` files (what the original LLaVA's `save_pretrained` and its LoRA
runs write) are read with `torch.load(weights_only=True)` only, which refuses anything but tensors and
plain containers: a checkpoint cannot run code on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from grounded_llava.errors import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint in another format that cannot be converted as it is (names the file and the field)."""


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.safetensors` or `.bin` file (CPU)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file is the same user error
        raise ConversionError(f"{path} cannot be read as tensors (weights_only=True): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors")
    return state


def read_weights(directory: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of `directory`'s `<stem>.safetensors` / `pytorch_<stem>.bin` (or their sharded index).

    `stem`: "model" for a model, "adapter_model" for a peft adapter (`adapter_model.safetensors` / `.bin`).
    """
    candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    candidates += [f"pytorch_{stem}.bin", f"pytorch_{stem}.bin.index.json", f"{stem}.bin"]
    for name in candidates:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise ConversionError(f"{path}: no readable 'weight_map' ({err})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_tensor_file(directory / shard))
            return state
        return read_tensor_file(path)
    raise ConversionError(f"{directory} holds no weights ({', '.join(candidates)})")
