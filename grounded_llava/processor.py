"""`GroundedProcessor`: every image and text <-> tensor conversion; the model sees only tensors.

LLaVA-1.5 conversation template (multi-turn):
    <s>{system} USER: <image x N>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>
Labels are -100 everywhere except the assistant answers and their closing `</s>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint_layout import PROCESSOR_FILE
from .codec import ParsedAnswer, parse_grounded
from .conversation import IMAGE_TOKEN
from .image_meta import ImageMeta, pad_to_square_and_resize
from .tokenizer import GroundingTokenIds

IGNORE_INDEX = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Conversation = Sequence[dict[str, str]]


@dataclass
class EncodedConversation:
    """One tokenised sample: `input_ids`/`labels` (T,) and where its image sits (None: text only)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_meta: ImageMeta | None = None


@dataclass
class GroundedBatch:
    """A padded batch. `pixel_values` (I, 3, S, S) holds the I <= B images in sample order;
    `image_sample_index` (I,) says which sample each image belongs to; `original_sizes` (I, 2) is (W, H)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sample_index: torch.Tensor
    original_sizes: torch.Tensor
    image_metas: list[ImageMeta] = field(default_factory=list)

    def select(self, rows: torch.Tensor) -> GroundedBatch:
        """The sub-batch of sample rows `rows` (1-D long tensor, increasing), with their images."""
        keep = torch.isin(self.image_sample_index, rows)
        new_row = torch.full((self.input_ids.shape[0],), -1, dtype=torch.long)
        new_row[rows] = torch.arange(rows.numel())
        return GroundedBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            labels=self.labels[rows],
            pixel_values=self.pixel_values[keep] if self.pixel_values is not None and keep.any() else None,
            image_sample_index=new_row[self.image_sample_index[keep]],
            original_sizes=self.original_sizes[keep],
            image_metas=[m for m, k in zip(self.image_metas, keep.tolist(), strict=True) if k],
        )

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of `GroundedLlavaForConditionalGeneration.forward`."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "pixel_values": self.pixel_values,
            "image_sample_index": self.image_sample_index,
            "original_sizes": self.original_sizes,
        }


class GroundedProcessor:
    """Pad-to-square + resize + normalise images; LLaVA-1.5 template; grounding-token parsing.

    Args:
        tokenizer: holds `<image>` and the grounding tokens (see `tokenizer.add_grounding_tokens`).
        image_size: side S of the square canvas.
        num_image_tokens: image tokens per image in the LLM input. For CLIP with the "default" feature
            strategy this is (S / patch)^2: the vision tower's CLS token (its one additional image
            token) is dropped, as LlavaProcessor computes with `num_additional_image_tokens=1`.
        num_bins: coordinate bins of the `<loc_k>` tokens.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_size: int,
        num_image_tokens: int,
        num_bins: int,
        system_prompt: str,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_length: int = 2048,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.num_bins = num_bins
        self.system_prompt = system_prompt
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.max_length = max_length
        self.token_ids = GroundingTokenIds.from_tokenizer(tokenizer, num_bins)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, ImageMeta]:
        """PIL image (any size/mode) -> pixel_values (3, S, S) normalised, and its `ImageMeta`."""
        meta = ImageMeta(original_size=image.size, canvas_size=self.image_size)
        fill = tuple(int(round(255 * m)) for m in self.image_mean)
        canvas = pad_to_square_and_resize(image, self.image_size, fill)
        array = np.asarray(canvas, dtype=np.float32) / 255.0
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        pixels = torch.from_numpy((array - mean) / std).permute(2, 0, 1).contiguous()
        return pixels, meta

    # ------------------------------------------------------------------ text
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_answer(self, answer: str) -> list[int]:
        """An assistant answer's ids as a conversation holds them after "ASSISTANT:" (without the eos)."""
        return self._ids(" " + answer.strip())

    def _human_ids(self, text: str, has_image: bool) -> list[int]:
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != (1 if has_image else 0):
            raise ValueError(
                f"image-token count mismatch: the human turn has {len(parts) - 1} {IMAGE_TOKEN} marker(s) "
                f"but {1 if has_image else 0} image is given"
            )
        ids: list[int] = []
        for index, part in enumerate(parts):
            if index:
                ids += [self.image_token_id] * self.num_image_tokens
            if part:
                ids += self._ids(part)
        return ids

    def encode_conversation(
        self,
        conversation: Conversation,
        image: Image.Image | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> EncodedConversation:
        """Tokenise LLaVA-format turns (`{"from": "human"|"gpt", "value"}`); answers are the labels.

        A conversation ending with a human turn needs `add_generation_prompt=True` (inference): the
        sequence then ends with "ASSISTANT:". `<image>` must appear once in the human turns iff
        `image` is given.
        """
        if not conversation:
            raise ValueError("empty conversation")
        image_markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversation)
        if image_markers != (1 if image is not None else 0):
            raise ValueError(
                f"image-token count mismatch: {image_markers} {IMAGE_TOKEN} marker(s) in the conversation "
                f"but {1 if image is not None else 0} image given"
            )
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        labels = [IGNORE_INDEX] * len(ids)
        prefix = self.system_prompt + " " if self.system_prompt else ""
        for index, turn in enumerate(conversation):
            role, value = turn.get("from"), turn.get("value")
            expected = "human" if index % 2 == 0 else "gpt"
            if role != expected or not isinstance(value, str):
                raise ValueError(
                    f"turn {index}: expected a {expected!r} turn with a string value, got {turn!r}"
                )
            if role == "human":
                if not value.strip():
                    raise ValueError(f"turn {index}: empty prompt")
                turn_ids = self._ids(prefix + "USER: ") + self._human_ids(value, IMAGE_TOKEN in value)
                turn_ids += self._ids(" ASSISTANT:")
                ids += turn_ids
                labels += [IGNORE_INDEX] * len(turn_ids)
                prefix = ""
            else:
                answer_ids = self.encode_answer(value) + [self.tokenizer.eos_token_id]
                ids += answer_ids
                labels += answer_ids
        if conversation[-1]["from"] == "human" and not add_generation_prompt:
            raise ValueError("the conversation ends with a human turn: pass add_generation_prompt=True")
        if len(ids) > self.max_length:
            raise ValueError(f"conversation of {len(ids)} tokens exceeds max_length {self.max_length}")
        pixel_values, meta = self.preprocess_image(image) if image is not None else (None, None)
        return EncodedConversation(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            image_meta=meta,
        )

    def collate(
        self, samples: Sequence[EncodedConversation], *, padding_side: str = "right"
    ) -> GroundedBatch:
        """Pad a list of encoded conversations into a batch (left padding for generation)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            window = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[row, window] = sample.input_ids
            labels[row, window] = sample.labels
            attention_mask[row, window] = 1
        with_image = [i for i, s in enumerate(samples) if s.pixel_values is not None]
        metas = [samples[i].image_meta for i in with_image]
        return GroundedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values=torch.stack([samples[i].pixel_values for i in with_image]) if with_image else None,
            image_sample_index=torch.tensor(with_image, dtype=torch.long),
            original_sizes=torch.tensor([m.original_size for m in metas], dtype=torch.long).reshape(-1, 2),
            image_metas=metas,
        )

    def __call__(
        self,
        conversations: Sequence[Conversation],
        images: Sequence[Image.Image | None],
        *,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
    ) -> GroundedBatch:
        """Encode and pad a batch of conversations, `images[i]` belonging to `conversations[i]`."""
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        encoded = [
            self.encode_conversation(c, i, add_generation_prompt=add_generation_prompt)
            for c, i in zip(conversations, images, strict=True)
        ]
        return self.collate(encoded, padding_side=padding_side)

    # ------------------------------------------------------------------ decoding
    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Token ids -> text that keeps the grounding tokens but drops pad/eos/bos/image tokens."""
        drop = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.tokenizer.bos_token_id}
        drop.add(self.image_token_id)
        ids = [int(t) for t in token_ids if int(t) not in drop]
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    def parse(self, text: str, meta: ImageMeta) -> ParsedAnswer:
        """Parse a generated answer; boxes come back in original pixels of the image `meta` describes."""
        return parse_grounded(text, meta.original_size, num_bins=self.num_bins)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        settings = {
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "num_bins": self.num_bins,
            "system_prompt": self.system_prompt,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "max_length": self.max_length,
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GroundedProcessor:
        directory = Path(directory)
        settings_file = directory / PROCESSOR_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file} is missing: not a grounded-llava processor directory")
        settings = json.loads(settings_file.read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(tokenizer, **settings)
