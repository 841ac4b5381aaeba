"""Answers given rather than generated: one teacher-forced pass yields what generation keeps.

`GroundedLlava.score` grounds a given answer (its boxes scored, its `<seg>`s masked) through the same
`_ground` step as `chat`: this module turns (prompt, answer ids) into the `DecodedAnswers` that
`decode_grounded` would have kept, i.e. each answer token's log-probability, the hidden state that emits
each `<seg>`, and the Detect head's outputs. Every box counts as written by the LM (no pointer choices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grounded_llava.inference.decoding import DecodedAnswers
from grounded_llava.inference.grounding import find_box_groups, token_log_probs
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.tokenizer import GroundingTokenIds


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
    prompt's; a given answer may hold both. Such tokens are replaced by the pad token with
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


@torch.inference_mode()
def forced_answers(
    model: GroundedLlavaForConditionalGeneration,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    features: torch.Tensor,
    pyramid: list[torch.Tensor],
    pixel_values: torch.Tensor,
    original_sizes: torch.Tensor,
    pad_token_id: int,
) -> DecodedAnswers:
    """One right-padded forward over each prompt + answer (row r: image r of `features` (I, N, D), of the
    neck's `pyramid`, of `pixel_values` (I, 3, S, S) (the region tokens read the canvas too) and of
    `original_sizes` (I, 2) (W, H)): the answers' `DecodedAnswers`, positions in answer coordinates."""
    rows = [
        teacher_forcing_inputs(
            [*prompt, *answer],
            answer_start=len(prompt),
            token_ids=model.token_ids,
            image_token_id=model.image_token_id,
            pad_token_id=pad_token_id,
        )
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    # Right padding: every row keeps positions 0..n-1, as when it is run alone.
    input_ids = torch.full((len(rows), max(len(ids) for ids, _ in rows)), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, (ids, attention) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = torch.tensor(attention)
    device = features.device
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        image_features=features,
        pyramid=pyramid,
        pixel_values=pixel_values.to(device),
        image_sample_index=torch.arange(len(rows), device=device),
        original_sizes=original_sizes.to(device),
        compute_masks=False,
    )
    log_probs, seg_states = [], []
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        start = len(prompt)
        log_probs.append(token_log_probs(out.logits[r], rows[r][0])[start : start + len(answer)])
        seg_states.append(  # the state at t - 1 emits the `<seg>` at t (the same rule as training's prompts)
            {g.seg_position: out.last_hidden_state[r, start + g.seg_position - 1] for g in
             find_box_groups(answer, model.token_ids) if g.seg}
        )  # fmt: skip
    return DecodedAnswers(
        [list(a) for a in answers], [[] for _ in answers], log_probs, seg_states, out.detections
    )
