"""Token-level view of a generated answer: box groups, their token probabilities and their `<seg>` masks.

The grammar is read by `grounded_llava.grammar` for both the decoded *text* (the codec) and the
*token ids* (here, and the model's `<seg>` prompts: the box of the group right before `<seg>`).
This module scores the groups from teacher-forced logits, prepares ids the model accepts (stray
tokens masked out) and pairs the text's parsed boxes with their token groups. Positions index the
id sequence.
"""

from __future__ import annotations

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
    "teacher_forcing_inputs",
]


def find_box_groups(ids: Sequence[int], token_ids: GroundingTokenIds, *, start: int = 0) -> list[BoxGroup]:
    """Every complete box group in `ids[start:]`, reading order, inverted ones too (the model reads them).

    A group is `<box> l0 l1 l2 l3 </box>` at positions `g.start..g.start + 5`; `g.seg` when the id at
    `g.start + 6` (`g.seg_position`) is `<seg>`. Positions index `ids`.
    """
    return parse(lex_ids(ids, token_ids, start=start)).groups


def teacher_forcing_inputs(
    ids: Sequence[int],
    *,
    answer_start: int,
    token_ids: GroundingTokenIds,
    image_token_id: int,
    pad_token_id: int,
) -> tuple[list[int], list[int]]:
    """Ids (and attention) for the teacher-forced pass over prompt + answer, in a form the model accepts.

    The model rejects a `<seg>` that does not follow a box group and image tokens beyond the
    prompt's; generated text may hold both. Such tokens are replaced by the pad token with
    attention 0 (later tokens do not see them); the codec drops them too when parsing the text.

    Returns:
        (ids, attention_mask), both lists of len(ids).
    """
    ids = [int(t) for t in ids]
    attention = [1] * len(ids)
    valid_seg = {g.seg_position for g in find_box_groups(ids, token_ids) if g.seg}
    for position, token in enumerate(ids):
        stray_seg = token == token_ids.seg and position not in valid_seg
        stray_image = token == image_token_id and position >= answer_start
        if stray_seg or stray_image:
            ids[position], attention[position] = pad_token_id, 0
    return ids, attention


def group_probability(logits: torch.Tensor, ids: Sequence[int], group: BoxGroup) -> float:
    """Geometric mean of the probabilities of a group's four `<loc_k>` tokens, in [0, 1].

    Args:
        logits: (T, V) teacher-forced logits of the sequence `ids`; row t scores token t + 1.
    """
    positions = list(range(group.start + 1, group.start + 5))
    log_probs = logits[[p - 1 for p in positions]].float().log_softmax(-1)  # (4, V)
    targets = torch.as_tensor([int(ids[p]) for p in positions], device=logits.device)
    return float(log_probs.gather(1, targets[:, None]).mean().exp())


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
