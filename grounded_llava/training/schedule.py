"""The learning-rate schedule of every stage: linear warmup, then cosine decay to 0."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The LR factor of step `step` (for `LambdaLR`): (step + 1) / warmup over the first
    `warmup_ratio * total_steps` steps (at least 1), then a cosine from 1 to 0 at `total_steps`."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
