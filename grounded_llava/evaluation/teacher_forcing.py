"""Teacher-forced passes over given answers: token probabilities of written boxes, and the chat KL.

A sequence is the single-turn conversation "<image>\\n{prompt}" -> answer, encoded by the processor
exactly as training encodes it (and as the predictor encodes its prompts), run through the model's
`forward` with `compute_masks=False`. Position t of the logits predicts token t + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grounded_llava.conversation import IMAGE_TOKEN, human_turn
from grounded_llava.errors import UsageError
from grounded_llava.evaluation.chat_metrics import mean_token_kl
from grounded_llava.evaluation.tasks import TextBox
from grounded_llava.image_meta import ImageMeta
from grounded_llava.inference.grounding import answer_box_groups, group_probability, token_log_probs
from grounded_llava.inference.images import load_image
from grounded_llava.inference.predictor import GroundedLlava
from grounded_llava.processor import IGNORE_INDEX


@dataclass
class ForcedPass:
    """Outputs of one teacher-forced batch (right padded).

    Attributes:
        logits: (B, T, V) float.
        input_ids: (B, T) long.
        answer_targets: (B, T - 1) bool, True where the NEXT token is an answer token (eos included):
            the positions of `logits[:, :-1]` that score the answer.
        metas: per row, the image geometry.
    """

    logits: torch.Tensor
    input_ids: torch.Tensor
    answer_targets: torch.Tensor
    metas: list[ImageMeta]


@torch.inference_mode()
def forced_pass(
    predictor: GroundedLlava, images: Sequence[Path], prompts: Sequence[str], answers: Sequence[str]
) -> ForcedPass:
    """Run `predictor.model` over prompt + answer for each (image, prompt, answer).

    `answers` are answer texts with their grounding tokens (`GroundedAnswer.raw_text`). A literal
    "<image>" in an answer is removed: the model accepts image tokens in the prompt only.
    """
    processor = predictor.processor
    encoded = [
        processor.encode_conversation(
            [
                human_turn(prompt, first=True),
                {"from": "gpt", "value": answer.replace(IMAGE_TOKEN, "")},
            ],
            load_image(image),
        )
        for image, prompt, answer in zip(images, prompts, answers, strict=True)
    ]
    batch = processor.collate(encoded, padding_side="right")
    device = predictor.device
    logits = predictor.model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        pixel_values=batch.pixel_values.to(device),
        image_sample_index=batch.image_sample_index.to(device),
        original_sizes=batch.original_sizes.to(device),
        compute_masks=False,
    ).logits
    return ForcedPass(
        logits=logits.float().cpu(),
        input_ids=batch.input_ids,
        answer_targets=batch.labels[:, 1:] != IGNORE_INDEX,
        metas=batch.image_metas,
    )


def text_box_probabilities(
    predictor: GroundedLlava,
    images: Sequence[Path],
    prompt: str,
    answers: Sequence[str],
    *,
    batch_size: int,
) -> list[list[TextBox]]:
    """The boxes written in each answer (original pixels), with the geometric mean probability of their
    four `<loc_k>` tokens (`group_probability`, as the predictor scores text boxes)."""
    processor = predictor.processor
    token_ids = predictor.model.token_ids
    boxes: list[list[TextBox]] = []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        out = forced_pass(predictor, images[chunk], [prompt] * len(images[chunk]), answers[chunk])
        for row, (answer, meta) in enumerate(zip(answers[chunk], out.metas, strict=True)):
            ids = out.input_ids[row].tolist()
            log_probs = token_log_probs(out.logits[row], ids)
            answer_start = int(out.answer_targets[row].nonzero()[0]) + 1
            spans = processor.parse(answer, meta).spans
            groups = answer_box_groups(
                spans,
                ids,
                answer_start=answer_start,
                token_ids=token_ids,
                image_size=meta.original_size,
                num_bins=processor.num_bins,
            )
            boxes.append(
                [
                    TextBox(
                        box=tuple(float(v) for v in box),
                        phrase=span.phrase,
                        score=0.0 if group is None else group_probability(log_probs, group),
                    )
                    for span, span_groups in zip(spans, groups, strict=True)
                    for box, group in zip(span.boxes, span_groups, strict=True)
                ]
            )
    return boxes


def chat_kl(
    model: GroundedLlava,
    reference: GroundedLlava,
    images: Sequence[Path],
    prompts: Sequence[str],
    reference_answers: Sequence[str],
    *,
    batch_size: int,
) -> float:
    """Mean token KL(reference || model) over the reference's answer tokens (eos included), teacher-forced
    through both models; every answer token weighs the same, whatever its answer.

    Raises:
        ValueError: the two models tokenize differently or have different vocabularies.
    """
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        ref = forced_pass(reference, images[chunk], prompts[chunk], reference_answers[chunk])
        out = forced_pass(model, images[chunk], prompts[chunk], reference_answers[chunk])
        if not torch.equal(ref.input_ids, out.input_ids) or ref.logits.shape != out.logits.shape:
            raise UsageError(
                "chat_kl: the model and --reference tokenize the chat prompts differently (vocabularies "
                f"{out.logits.shape[-1]} and {ref.logits.shape[-1]}): they must share the tokenizer"
            )
        positions = int(out.answer_targets.sum())
        total += mean_token_kl(ref.logits[:, :-1], out.logits[:, :-1], out.answer_targets) * positions
        count += positions
    return total / count
