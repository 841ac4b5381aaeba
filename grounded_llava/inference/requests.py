"""A prompt to answer, encoded as the model reads it: the conversation up to "ASSISTANT:" and its image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from grounded_llava.conversation import human_turn
from grounded_llava.image_meta import ImageMeta
from grounded_llava.inference.images import ImageInput, load_image
from grounded_llava.inference.results import GroundedAnswer
from grounded_llava.inference.scene import scene_lines
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.processor import EncodedConversation, GroundedProcessor
from grounded_llava.scene_line import with_scene_line

History = Sequence[tuple[str, "str | GroundedAnswer"]]


@dataclass
class Request:
    """One prompt to answer: the conversation encoded up to "ASSISTANT:", its image geometry, the question;
    the turns and the image it was encoded from (the scene line re-encodes them), and that line (None: none)."""

    encoded: EncodedConversation
    meta: ImageMeta
    question: str
    turns: list[dict[str, str]]
    image: Image.Image
    scene_line: str | None = None


def build_request(processor: GroundedProcessor, image: ImageInput, prompt: str, history: History) -> Request:
    """`prompt` about `image` after the (question, answer) turns of `history` (the image opens the first)."""
    turns: list[dict[str, str]] = []
    for index, (question, answer) in enumerate([*history, (prompt, None)]):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"empty prompt (turn {index})" if history else "empty prompt")
        turns.append(human_turn(question, first=index == 0))
        if answer is not None:
            turns.append(
                {"from": "gpt", "value": answer.raw_text if isinstance(answer, GroundedAnswer) else answer}
            )
    loaded = load_image(image)
    encoded = processor.encode_conversation(turns, loaded, add_generation_prompt=True)
    return Request(encoded=encoded, meta=encoded.image_meta, question=prompt, turns=turns, image=loaded)


def with_scene_lines(
    model: GroundedLlavaForConditionalGeneration, requests: list[Request], pyramid: list[torch.Tensor]
) -> list[Request]:
    """With `model.config.scene_line`: the requests re-encoded with their image's scene line (`inference/scene.py`;
    `pyramid`: the neck's maps of their images); the requests as they are otherwise."""
    if not model.config.scene_line:
        return requests
    device = pyramid[0].device
    pixel_values = torch.stack([r.encoded.pixel_values for r in requests]).to(device)
    return [
        replace(r, scene_line=line, encoded=model.processor.encode_conversation(
            with_scene_line(r.turns, line), r.image, add_generation_prompt=True))
        for r, line in zip(requests, scene_lines(model, pyramid, pixel_values), strict=True)
    ]  # fmt: skip
