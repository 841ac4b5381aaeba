"""Forgetting across the stages of a training manifest.

Both functions take an accuracy matrix `acc` (T x T, list of rows): `acc[i][j]` is the metric of task j
(higher is better, e.g. the AP on the categories introduced at stage j) measured after training stage i.
Entries may be None where a task was not evaluated (typically j > i: not learnt yet); pairs with a None
are skipped, and a result is None when nothing is left to average.
"""

from __future__ import annotations

from collections.abc import Sequence


def _checked_square(acc: Sequence[Sequence[float | None]]) -> int:
    size = len(acc)
    for index, row in enumerate(acc):
        if len(row) != size:
            raise ValueError(
                f"acc must be square (T x T) with T = {size}, but row {index} has {len(row)} entries"
            )
    return size


def backward_transfer(acc: Sequence[Sequence[float | None]]) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory").

    BWT = mean over j < T-1 of (acc[T-1][j] - acc[j][j]): how the final model does on each earlier task
    compared with right after learning it. Negative = forgetting, positive = later stages helped.

    Returns:
        BWT, or None when T < 2 or every pair has a None.
    """
    size = _checked_square(acc)
    last = acc[size - 1] if size else []
    deltas = [last[j] - acc[j][j] for j in range(size - 1) if last[j] is not None and acc[j][j] is not None]
    return sum(deltas) / len(deltas) if deltas else None


def forgetting(acc: Sequence[Sequence[float | None]]) -> float | None:
    """Average forgetting (Chaudhry et al., 2018, "Riemannian Walk").

    F = mean over j < T-1 of (max over i < T-1 of acc[i][j]) - acc[T-1][j]: the drop from the best value
    a task ever had before the last stage. Positive = forgotten.

    Returns:
        F, or None when T < 2 or no task has both a final value and an earlier one.
    """
    size = _checked_square(acc)
    drops = []
    for j in range(size - 1):
        earlier = [acc[i][j] for i in range(size - 1) if acc[i][j] is not None]
        final = acc[size - 1][j]
        if earlier and final is not None:
            drops.append(max(earlier) - final)
    return sum(drops) / len(drops) if drops else None
