"""Chat metrics: does grounding training keep the base model's answers?

`mean_token_kl` compares next-token distributions of a reference model (the base LLaVA, or the previous
stage's snapshot) and the evaluated model on the same chat tokens; `chat_exact_match` compares their
greedy answers as text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def chat_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation.

    Runs of whitespace become one space and the ends are stripped; case and punctuation still count.

    Args:
        predictions: N generated answers (the evaluated model).
        references: N reference answers (ground truth, or the base model's answers).
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} entries but references has {len(references)}")
    if not predictions:
        raise ValueError("chat_exact_match needs at least one prediction")
    matches = sum(
        _normalise_whitespace(p) == _normalise_whitespace(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return matches / len(predictions)


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at every position, p = softmax(logits_p), q = softmax(logits_q) over the vocabulary.

    Computed from `log_softmax` in float32 (at least), so large logits neither overflow nor give
    0 * log 0 = NaN. Differentiable in both arguments (usable as a distillation loss).

    Args:
        logits_p: (..., V) reference logits (base model / previous stage), e.g. (B, T, V) or (P, V).
        logits_q: the same shape: logits of the evaluated model.

    Returns:
        (...) KL in nats, >= 0: one per position.
    """
    if logits_p.shape != logits_q.shape or logits_p.ndim < 2:
        raise ValueError(
            f"logits_p and logits_q must both be (..., V) of one shape, got {tuple(logits_p.shape)} and "
            f"{tuple(logits_q.shape)}"
        )
    dtype = torch.promote_types(logits_p.dtype, torch.float32)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def mean_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of KL(p || q) over the positions where `mask` is True (see `token_kl`).

    Args:
        logits_p: (B, T, V) reference logits (base model / previous stage).
        logits_q: (B, T, V) logits of the evaluated model, same tokens.
        mask: (B, T) bool, True at the positions to score (e.g. assistant-answer tokens).

    Returns:
        Mean KL in nats over masked positions (each position weighs the same, whatever its sequence).
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(logits_p.shape[:2]):
        raise ValueError(
            f"mask must be a bool (B, T) tensor matching logits {tuple(logits_p.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not mask.any():
        raise ValueError("mask selects no position: the mean KL is undefined")
    with torch.no_grad():
        return float(token_kl(logits_p, logits_q)[mask].mean())
