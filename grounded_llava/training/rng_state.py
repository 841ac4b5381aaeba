"""Every RNG a training step draws from (python, numpy, torch CPU and CUDA), as checkpointable data."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """RNG states as plain python objects and tensors (loadable with `torch.load(weights_only=True)`)."""
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (bit_generator, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body without consuming any RNG: work a resumed run does that the uninterrupted one did
    not (loading a model, which draws its initial weights) leaves the following draws unchanged."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
