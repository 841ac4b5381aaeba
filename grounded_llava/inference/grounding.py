"""Token-level view of a generated answer: box groups, their token probabilities and their `<seg>` masks.

The grammar is read by `grounded_llava.grammar` for both the decoded *text* (the codec) and the
*token ids* (here, and the model's `<seg>` prompts: the box of the group right before `<seg>`).
This module scores the groups from their tokens' log-probabilities (as generated, or teacher-forced)
and pairs the text's parsed boxes with their token groups. Positions index the id sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grounded_llava.codec import GroundedSpan, decode_bins
from grounded_llava.grammar import BoxGroup, lex_ids, parse
from grounded_llava.tokenizer import GroundingTokenIds

__all__ = [
    "BoxGroup",
    "align_boxes",
    "answer_box_groups",
    "find_box_groups",
    "group_probability",
    "token_log_probs",
]


def find_box_groups(ids: Sequence[int], token_ids: GroundingTokenIds, *, start: int = 0) -> list[BoxGroup]:
    """Every complete box group in `ids[start:]`, reading order, inverted ones too (the model reads them).

    A group is `<box> l0 l1 l2 l3 </box>` at positions `g.start..g.start + 5`; `g.seg` when the id at
    `g.start + 6` (`g.seg_position`) is `<seg>`. Positions index `ids`.
    """
    return parse(lex_ids(ids, token_ids, start=start)).groups


def token_log_probs(logits: torch.Tensor, ids: Sequence[int]) -> list[float]:
    """log P(ids[t] | ids[:t]) for every position t of a teacher-forced sequence (0.0 at t = 0).

    Args:
        logits: (T, V) teacher-forced logits of the sequence `ids`; row t scores token t + 1.
    """
    targets = torch.as_tensor([int(i) for i in ids[1:]], device=logits.device)
    scored = logits[:-1].float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return [0.0, *scored.tolist()]


def group_probability(log_probs: Sequence[float], group: BoxGroup) -> float:
    """Geometric mean of the probabilities of a group's four `<loc_k>` tokens, in [0, 1].

    Args:
        log_probs: per position of the sequence `group` indexes, the log-probability of its token (as
            generated: `DecodedAnswers.log_probs`; teacher-forced: `token_log_probs`).
    """
    return math.exp(sum(log_probs[group.start + 1 : group.start + 5]) / 4)


def align_boxes(
    spans: Sequence[GroundedSpan], groups: Sequence[BoxGroup], *, image_size: tuple[int, int], num_bins: int
) -> list[list[int | None]]:
    """For each parsed box (`spans[i].boxes[j]`), the index of its token group in `groups`.

    The text's valid groups are a subsequence of the token groups (inverted ones are dropped), so
    walking both in reading order and matching equal boxes (both decoded by `codec.decode_bins`)
    pairs them. None only when the text holds a group that is not consecutive in the ids (tokens
    that decode to nothing in between).
    """
    group_boxes = [decode_bins(g.bins, image_size, num_bins) for g in groups]
    cursor = 0
    aligned: list[list[int | None]] = []
    for span in spans:
        row: list[int | None] = []
        for box in span.boxes:
            found = next((k for k in range(cursor, len(groups)) if group_boxes[k] == tuple(box)), None)
            if found is not None:
                cursor = found + 1
            row.append(found)
        aligned.append(row)
    return aligned


def answer_box_groups(
    spans: Sequence[GroundedSpan],
    ids: Sequence[int],
    *,
    answer_start: int,
    token_ids: GroundingTokenIds,
    image_size: tuple[int, int],
    num_bins: int,
) -> list[list[BoxGroup | None]]:
    """For each parsed box of an answer (`spans[i].boxes[j]`), its token group in `ids[answer_start:]`.

    Args:
        spans: the answer's parsed spans (boxes xyxy, original pixels of `image_size` (W, H)).
        ids: the teacher-forced sequence (prompt + answer); groups' positions index it.
    Returns:
        Per span, per box: its `BoxGroup` (for `group_probability` and `seg_position`), or None.
    """
    groups = find_box_groups(ids, token_ids, start=answer_start)
    aligned = align_boxes(spans, groups, image_size=image_size, num_bins=num_bins)
    return [[None if k is None else groups[k] for k in row] for row in aligned]
