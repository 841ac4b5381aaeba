"""NaN and inf in training: a step with a non-finite loss is skipped, too many in a row stop the run,
and no checkpoint ever holds a non-finite tensor.

Why skip rather than train on: one NaN loss makes every gradient NaN, the optimizer writes them into the
weights, and every later step, checkpoint and `keep_last` pruning carries the damage forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from grounded_llava.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator


class NonFiniteError(UserError, RuntimeError):
    """Training produced NaN/inf: too many consecutive non-finite losses, or a non-finite tensor to save."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Name -> number of NaN/inf values, for every floating-point tensor of `tensors` that has any."""
    counts = {}
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[name] = bad
    return counts


def optimizer_tensors(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an `optimizer.state_dict()` by `<param index>.<name>` (e.g. AdamW's `3.exp_avg`)."""
    return {
        f"{index}.{name}": value
        for index, per_param in state_dict["state"].items()
        for name, value in per_param.items()
        if torch.is_tensor(value)
    }


def check_finite(tensors: Mapping[str, torch.Tensor], *, where: str, what: str) -> None:
    """Raise `NonFiniteError` (naming `where`, the first bad tensor and the count) if any value is NaN/inf."""
    bad = nonfinite_tensors(tensors)
    if bad:
        name, count = next(iter(bad.items()))
        raise NonFiniteError(
            f"{where}: refusing to save: {what} tensor {name!r} holds {count} NaN/inf value(s) "
            f"({len(bad)} tensor(s) in all); earlier checkpoints are kept"
        )


class NonFiniteGuard:
    """Decides per optimizer step whether to apply it, and stops after `max_consecutive` skipped steps.

    Every rank must call `step_is_finite` at the same steps: the verdict is all-reduced, because one rank's
    NaN loss reaches every rank's gradients through DDP's all-reduce.
    """

    def __init__(self, max_consecutive: int, accelerator: Accelerator) -> None:
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.consecutive = 0
        self.in_window = 0
        """Skipped steps since the last `take_window_count` (one metrics record)."""

    def step_is_finite(self, losses: Iterable[torch.Tensor]) -> bool:
        """True when the loss of every micro-batch of this step is finite on every rank (else the step is
        counted as skipped)."""
        finite = all(bool(torch.isfinite(loss.detach()).all()) for loss in losses)
        flag = torch.tensor(0.0 if finite else 1.0, device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="max")) > 0:
            self.consecutive += 1
            self.in_window += 1
            return False
        self.consecutive = 0
        return True

    def take_window_count(self) -> int:
        count, self.in_window = self.in_window, 0
        return count

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_if_exhausted(self, *, stage: str, step: int) -> None:
        """Raise `NonFiniteError` once `max_consecutive` steps in a row were skipped."""
        if self.exhausted:
            first = step - self.consecutive + 1
            raise NonFiniteError(
                f"stage {stage!r}: {self.consecutive} consecutive steps ({first}-{step}) had a non-finite "
                f"loss and were skipped (train.max_nonfinite_steps={self.max_consecutive}); stopped: "
                "lower the learning rate or check the data, then resume from the last checkpoint"
            )


def finite_or_none(value: float) -> float | None:
    """`value`, or None for NaN/inf (JSON has no NaN: written as null)."""
    return value if math.isfinite(value) else None
