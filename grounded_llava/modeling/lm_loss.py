"""The language-model loss, with the grounded phrases optionally weighted up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grammar import BatchBoxGroups
from ..processor import IGNORE_INDEX


def phrase_token_weights(
    groups: BatchBoxGroups, shape: torch.Size, phrase_weight: float
) -> torch.Tensor | None:
    """(B, T) float weights of the label positions: `phrase_weight` on the content of every grounded
    phrase and on its `</p>` (what to name, and where the name ends), 1 elsewhere; None when uniform."""
    if phrase_weight == 1.0 or groups.rows.numel() == 0:
        return None
    weights = torch.ones(shape, device=groups.rows.device)
    for row, start, end in zip(
        groups.rows.tolist(), groups.phrase_starts.tolist(), groups.phrase_ends.tolist(), strict=True
    ):
        if end > start:  # a group without a phrase has an empty one
            weights[row, start : end + 1] = phrase_weight
    return weights


def language_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one (-100: not
    supervised); with `weights` (B, T) over label positions, a weighted sum over the number of
    supervised tokens (so weight 1 everywhere is the plain mean)."""
    targets = labels[:, 1:].flatten()
    flat = logits[:, :-1].flatten(0, 1).float()
    if weights is None:
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
    per_token = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")
    supervised = targets != IGNORE_INDEX
    return (per_token * weights[:, 1:].flatten()).sum() / supervised.sum().clamp(min=1)
