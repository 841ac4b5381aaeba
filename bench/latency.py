"""`chat_latency_ratio`: `GroundedLlava.chat` latency / plain LLaVA `generate` latency, same tiny model.

Both sides answer the same prompt about the same image with exactly `new_tokens` new tokens
(`min_new_tokens = max_new_tokens`: eos cannot end an answer early), greedy decoding:
- grounded: the public `GroundedLlava.chat` (preprocessing, vision tower once, generate with LoRA and
  the pointer, then grounding from what generation kept: detections, a SAM mask per `<seg>`, parsing,
  reconciliation).
  `chat` has no `min_new_tokens` argument; the model's `generation_config.min_new_tokens` (which
  `generate` falls back to for unset arguments) is set for the duration of the benchmark.
- plain: a `LlavaForConditionalGeneration` built from the same transformers config with the same base
  weights, no adapter: the same processor's preprocessing, `generate(pixel_values=...)`, decoding.
The ratio is the grounding overhead of a chat turn.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from grounded_llava import GroundedLlavaConfig, GroundedLlavaForConditionalGeneration
from grounded_llava.conversation import human_turn
from grounded_llava.inference.predictor import GroundedLlava
from grounded_llava.inference.requests import build_request, with_scene_lines
from grounded_llava.modeling.base import base_state_dict, merge_adapters

from .timing import interleaved

PROMPT = "Where are the red circles?"


def plain_llava_like(model: GroundedLlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A transformers LLaVA with the grounded model's config and base weights, and no peft layers."""
    base = model.base_llava
    plain = LlavaForConditionalGeneration(base.config)
    missing, unexpected = plain.load_state_dict(base_state_dict(model.llava), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"base weights do not fit a plain LLaVA: missing {missing}, unexpected {unexpected}"
        )
    plain.generation_config = base.generation_config
    return plain.eval()


@contextlib.contextmanager
def fixed_answer_length(model: GroundedLlavaForConditionalGeneration, new_tokens: int):
    """Within the block, `generate` on the grounded model emits at least `new_tokens` tokens (no early eos)."""
    config = model.base_llava.generation_config
    previous = config.min_new_tokens
    config.min_new_tokens = new_tokens
    try:
        yield
    finally:
        config.min_new_tokens = previous


def benchmark_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A fixed non-square RGB image (so that both sides pad it to the square canvas)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def chat_latency(*, config: GroundedLlavaConfig, new_tokens: int, repeats: int, warmup: int = 1) -> dict:
    """Time both sides interleaved; returns the ratio, the timing and what was compared."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    plain = plain_llava_like(model)
    merge_adapters(model.llava)  # as `GroundedLlava.from_pretrained` does for inference
    predictor = GroundedLlava(model, device="cpu")
    processor = predictor.processor
    tokenizer = processor.tokenizer
    image = benchmark_image()

    def grounded() -> None:
        predictor.chat(image, PROMPT, max_new_tokens=new_tokens)

    def grounded_answer_length() -> int:
        """The length `chat` generates: its own generate step, run once on the same request."""
        request = build_request(processor, image, PROMPT, [])
        features, pyramid = predictor._encode([request])
        request = with_scene_lines(predictor.model, [request], pyramid)[0]
        decoded = predictor._generate(
            [request], features, pyramid, max_new_tokens=new_tokens, temperature=0.0
        )
        return len(decoded.ids[0])

    @torch.inference_mode()
    def plain_generate() -> int:
        turns = [human_turn(PROMPT, first=True)]
        encoded = processor.encode_conversation(turns, image, add_generation_prompt=True)
        input_ids = encoded.input_ids[None]
        sequences = plain.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=encoded.pixel_values[None],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answer = sequences[0, input_ids.shape[1] :]
        tokenizer.decode(answer, skip_special_tokens=False)
        return int(answer.numel())

    with fixed_answer_length(model, new_tokens):
        lengths = {"grounded_chat": grounded_answer_length(), "plain_generate": plain_generate()}
        if set(lengths.values()) != {new_tokens}:
            raise RuntimeError(f"answer lengths {lengths} differ from the forced {new_tokens} new tokens")
        timing = interleaved(
            {"grounded_chat": grounded, "plain_generate": plain_generate}, repeats=repeats, warmup=warmup
        )
    return {
        "ratio": timing.ratio("grounded_chat", "plain_generate"),
        **timing.to_dict(),
        "tokens_per_s": {name: new_tokens / seconds for name, seconds in timing.medians.items()},
        "new_tokens": new_tokens,
        "prompt": PROMPT,
        "image_size": list(image.size),
    }
