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


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) bool: the positions whose next token is supervised (-100: not)."""
    return labels[:, 1:] != IGNORE_INDEX


def language_loss(
    answer_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens.

    answer_logits: (P, V) the logits at `answer_positions(labels)`, in row-major order; labels: (B, T),
    -100 where not supervised; weights: (B, T) over label positions (None: 1). A weighted sum over the P
    supervised tokens (so weight 1 everywhere is the plain mean).
    """
    positions = answer_positions(labels)
    targets = labels[:, 1:][positions]
    if targets.numel() == 0:
        return answer_logits.sum() * 0.0
    per_token = F.cross_entropy(answer_logits.float(), targets, reduction="none")
    if weights is None:
        return per_token.mean()
    return (per_token * weights[:, 1:][positions]).sum() / targets.numel()
