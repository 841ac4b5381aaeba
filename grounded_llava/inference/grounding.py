"""Token-level view of a generated answer: box groups, their token probabilities and their `<seg>` masks.

The codec parses the decoded *text*; the model's heads read *token ids* (`<seg>` prompts take the
box of the `<box> l0 l1 l2 l3 </box>` run right before them). This module links the two: it finds
the box groups in the ids, scores them from teacher-forced logits, prepares ids the model accepts
(stray tokens masked out) and aligns parsed boxes with token groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grounded_llava.codec import BOX_CLOSE, BOX_OPEN, GroundedSpan, loc_token, parse_grounded
from grounded_llava.tokenizer import GroundingTokenIds


@dataclass(frozen=True)
class BoxGroup:
    """One `<box> l0 l1 l2 l3 </box>` run of consecutive token ids.

    Attributes:
        start: position of `<box>` in the sequence; the `<loc_k>` tokens sit at start+1..start+4.
        bins: the four `<loc_k>` bins (x0, y0, x1, y1).
        seg: True when the token right after `</box>` (position start+6) is `<seg>`.
    """

    start: int
    bins: tuple[int, int, int, int]
    seg: bool

    @property
    def seg_position(self) -> int:
        return self.start + 6


def find_box_groups(ids: Sequence[int], token_ids: GroundingTokenIds) -> list[BoxGroup]:
    """Every well-formed box group in `ids`, in reading order (the model's `<seg>` rule, on plain lists)."""
    bin_of = {token: k for k, token in enumerate(token_ids.loc)}
    groups = []
    for start in range(len(ids) - 5):
        if ids[start] != token_ids.box_open or ids[start + 5] != token_ids.box_close:
            continue
        bins = [bin_of.get(int(t), -1) for t in ids[start + 1 : start + 5]]
        if min(bins) < 0:
            continue
        seg = start + 6 < len(ids) and ids[start + 6] == token_ids.seg
        groups.append(BoxGroup(start=start, bins=(bins[0], bins[1], bins[2], bins[3]), seg=seg))
    return groups


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

    The codec keeps a subsequence of the token groups (it drops broken ones), so walking both in
    reading order and matching equal boxes pairs them. None only when the text holds a group
    that is not consecutive in the ids (tokens that decode to nothing in between).
    """
    group_boxes = [_group_box(g, image_size, num_bins) for g in groups]
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


def _group_box(group: BoxGroup, image_size: tuple[int, int], num_bins: int) -> tuple[float, ...]:
    """The box the codec decodes from this group (original pixels), through the codec itself."""
    text = BOX_OPEN + "".join(loc_token(b) for b in group.bins) + BOX_CLOSE
    spans = parse_grounded(text, image_size, num_bins=num_bins).spans
    return tuple(spans[0].boxes[0]) if spans else ()
