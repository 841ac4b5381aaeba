"""`GroundedLlava`: the stateful predictor (chat, batched prediction, head-only detection).

It wraps a `GroundedLlavaForConditionalGeneration` (the trainable nn.Module, STYLE rule 8) and runs
every request in three steps:

1. `_encode`: the vision tower and the neck run ONCE per image; features and pyramid are reused below.
2. `_generate`: `decode_grounded` (KV cache, left padding, positions from the attention mask; the
   features enter through `mm_encoder_outputs`): phrases name only classes the head reports; every
   `<box>` picks, through the pointer, one of the head's reported proposals of the class the phrase
   names; its box is forced as the loc tokens.
3. `_ground`: no second pass over the answer: generation kept what grounding needs (`DecodedAnswers`:
   each token's log-probability, the hidden state that emitted each `<seg>`, the Detect head's outputs).
   Each `<seg>` gets a mask prompted as in training (the box group before it and that state). A text box's
   score is the geometric mean of the probabilities of its four `<loc_k>` tokens (full-vocabulary
   softmax, temperature 1: the model's probability, not the sampling distribution). Boxes the pointer
   chose keep the proposal's exact box and score pointer probability x head score. Text boxes are then
   reconciled with the head's detections (`reconcile`).
Frames: boxes in results are xyxy ORIGINAL image pixels; masks are bool at original image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from grounded_llava.image_meta import ImageMeta
from grounded_llava.inference import decoding
from grounded_llava.inference.checkpoint_paths import load_grounded_model
from grounded_llava.inference.detections import Detections
from grounded_llava.inference.forced import forced_answers
from grounded_llava.inference.grounding import (
    align_boxes,
    find_box_groups,
    group_probability,
)
from grounded_llava.inference.head_results import category_names, head_detections
from grounded_llava.inference.images import ImageInput, load_image
from grounded_llava.inference.reconciliation import phrase_category_index, reconcile
from grounded_llava.inference.requests import History, Request, build_request, with_scene_lines
from grounded_llava.inference.results import GroundedAnswer
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.modeling.base import merge_adapters
from grounded_llava.modeling.prompts import bins_to_canvas


class GroundedLlava:
    """Answers questions about images with grounded phrases, boxes, masks and scores.

    Build it with `GroundedLlava.from_pretrained(dir_or_id)`; `model` is the wrapped nn.Module. The model
    `from_pretrained` loads is its own, and its LoRA adapters are merged into the base weights for inference
    (`modeling.base.merge_adapters`; not for a quantised base): edit or train it again only after
    `unmerge_adapters(model.llava)`. A model given to `GroundedLlava(model)` is used as it is.
    """

    def __init__(self, model: GroundedLlavaForConditionalGeneration, *, device: str | torch.device) -> None:
        if model.processor is None:
            raise ValueError("the model has no processor: load it with from_pretrained/from_config")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = model.processor
        bias = model.config.copy_bias  # the copy prior reads the whole vocabulary once
        self.copy_prior = decoding.CopyPrior(self.processor.tokenizer, bias) if bias else None

    @classmethod
    def from_pretrained(
        cls, dir_or_id: str | Path | None = None, *, device: str | torch.device | None = None
    ) -> GroundedLlava:
        """Load a checkpoint (None: the shipped default `checkpoints/tiny-shapes/`) onto `device` (default: cuda
        if any). A LLaVA directory (original or transformers layout) gets untrained grounding heads."""
        model = load_grounded_model(dir_or_id)
        if model.config.quantization == "none":  # one matmul per layer; checkpoints still store them apart
            merge_adapters(model.llava)
        return cls(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def categories(self) -> list[str]:
        """The detection label space (class id = index)."""
        return category_names(self.model)

    def chat(
        self,
        image: ImageInput,
        prompt: str,
        history: History | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        masks_for_detections: bool = False,
    ) -> GroundedAnswer:
        """Answer `prompt` about `image`, after the earlier turns `history` ((prompt, answer) pairs).

        An answer given as a `GroundedAnswer` enters the conversation as its `raw_text` (with its
        grounding tokens). The image is attached to the first turn. temperature 0 = greedy decoding.
        `masks_for_detections`: also give every head detection a box-prompted SAM mask.
        """
        request = build_request(self.processor, image, prompt, history or [])
        return self._run(
            [request],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            masks_for_detections=masks_for_detections,
        )[0]

    def predict(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompts: Sequence[str] | str,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        masks_for_detections: bool = False,
    ) -> list[GroundedAnswer]:
        """Single-turn answers for many images, `batch_size` generated at once (one prompt for all, or one each)."""
        images = [images] if isinstance(images, str | Path | Image.Image | np.ndarray) else list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        answers: list[GroundedAnswer] = []
        for start in range(0, len(images), batch_size):
            chunk = zip(images[start : start + batch_size], prompts[start : start + batch_size], strict=True)
            requests = [build_request(self.processor, image, prompt, []) for image, prompt in chunk]
            answers += self._run(
                requests,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                masks_for_detections=masks_for_detections,
            )
        return answers

    @torch.inference_mode()
    def score(
        self,
        image: ImageInput,
        prompt: str,
        answer: str,
        history: History | None = None,
        *,
        masks_for_detections: bool = False,
    ) -> GroundedAnswer:
        """Ground a given `answer` to `prompt` (text with its grounding tokens: a reference, another model's
        or an edited answer) as `chat` grounds its own: one teacher-forced pass scores each box by the
        probability of its four `<loc_k>` tokens under this model and masks each `<seg>`."""
        request = build_request(self.processor, image, prompt, history or [])
        features, pyramid = self._encode([request])
        request = with_scene_lines(self.model, [request], pyramid)[0]
        decoded = forced_answers(
            self.model,
            [request.encoded.input_ids.tolist()],
            [self.processor.encode_answer(answer)],
            features=features,
            pyramid=pyramid,
            pixel_values=request.encoded.pixel_values[None],
            original_sizes=torch.tensor([request.meta.original_size]),
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        return self._ground([request], features, pyramid, decoded, masks_for_detections=masks_for_detections)[
            0
        ]

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[ImageInput] | ImageInput,
        *,
        masks: bool = False,
        conf_threshold: float | None = None,
    ) -> list[Detections]:
        """The detection head alone (no text generation); `masks`: SAM masks prompted by each box alone.

        `conf_threshold` overrides the config's (`heads.conf_threshold`), e.g. 0.001 for COCO AP.
        """
        images = [images] if isinstance(images, str | Path | Image.Image | np.ndarray) else list(images)
        pixels, metas = zip(
            *(self.processor.preprocess_image(load_image(image)) for image in images), strict=True
        )
        pixel_values = torch.stack(pixels).to(self.device)
        features = self.model.encode_images(pixel_values)
        pyramid = self.model.image_pyramid(features, pixel_values)
        predictions = self.model.detection_head(pyramid)
        return head_detections(
            self.model,
            predictions,
            pyramid,
            pixel_values,
            list(metas),
            masks=masks,
            conf_threshold=conf_threshold,
        )

    # ------------------------------------------------------------------ steps
    def _run(
        self, requests: list[Request], *, max_new_tokens: int, temperature: float, masks_for_detections: bool
    ) -> list[GroundedAnswer]:
        features, pyramid = self._encode(requests)
        requests = with_scene_lines(self.model, requests, pyramid)
        decoded = self._generate(
            requests, features, pyramid, max_new_tokens=max_new_tokens, temperature=temperature
        )
        return self._ground(requests, features, pyramid, decoded, masks_for_detections=masks_for_detections)

    @torch.inference_mode()
    def _encode(self, requests: list[Request]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(I, N, D) projected image features, one row per request, and the neck's pyramid of them."""
        pixel_values = torch.stack([r.encoded.pixel_values for r in requests]).to(self.device)
        features = self.model.encode_images(pixel_values)
        return features, self.model.image_pyramid(features, pixel_values)

    @torch.inference_mode()
    def _generate(
        self,
        requests: list[Request],
        features: torch.Tensor,
        pyramid: list[torch.Tensor],
        *,
        max_new_tokens: int,
        temperature: float,
    ) -> decoding.DecodedAnswers:
        """Answer token ids per request (up to, not including, the first eos), `<box>`es pointed at proposals."""
        tokenizer = self.processor.tokenizer
        batch = self.processor.collate([r.encoded for r in requests], padding_side="left")
        return decoding.decode_grounded(
            self.model,
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            features=features,
            pyramid=pyramid,
            pixel_values=torch.stack([r.encoded.pixel_values for r in requests]).to(self.device),
            metas=[r.meta for r in requests],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            phrase_class=lambda ids: phrase_category_index(tokenizer.decode(list(ids)), self.categories),
            min_score=self.model.config.heads.conf_threshold,
            name_mask=decoding.NameMask(tokenizer, self.categories),
            copy_prior=self.copy_prior,
            questions=[r.question for r in requests],
        )

    @torch.inference_mode()
    def _ground(
        self,
        requests: list[Request],
        features: torch.Tensor,
        pyramid: list[torch.Tensor],
        decoded: decoding.DecodedAnswers,
        *,
        masks_for_detections: bool,
    ) -> list[GroundedAnswer]:
        """Detections, `<seg>` masks, box scores and reconciliation, from what generation kept (`decoded`:
        answer ids, token log-probabilities, pointer choices, `<seg>` states, the Detect head's outputs).
        `features`: (I, N, D) the requests' image features, `pyramid` the neck's maps of them."""
        metas = [request.meta for request in requests]
        pixel_values = torch.stack([r.encoded.pixel_values for r in requests]).to(self.device)
        detections = head_detections(
            self.model, decoded.head_outputs, pyramid, pixel_values, metas, masks=masks_for_detections
        )
        seg_mask_logits = self._seg_masks(pyramid, pixel_values, decoded, metas)
        return [
            self._grounded_answer(
                answer_ids=decoded.ids[r],
                log_probs=decoded.log_probs[r],
                seg_mask_logits=seg_mask_logits[r],
                detections=detections[r],
                meta=metas[r],
                choices=decoded.choices[r],
                scene_line=requests[r].scene_line,
            )
            for r in range(len(requests))
        ]

    def _seg_masks(
        self,
        pyramid: list[torch.Tensor],
        pixel_values: torch.Tensor,
        decoded: decoding.DecodedAnswers,
        metas: list[ImageMeta],
    ) -> list[dict[int, torch.Tensor]]:
        """Per answer, the (r, r) canvas mask logits of each `<seg>` (by its position in the answer), prompted
        as in training: the box group right before it and the hidden state that emitted it."""
        prompts = [
            (r, group.seg_position, group.bins)
            for r, answer in enumerate(decoded.ids)
            for group in find_box_groups(answer, self.model.token_ids)
            if group.seg
        ]
        masks: list[dict[int, torch.Tensor]] = [{} for _ in decoded.ids]
        if not prompts:
            return masks
        images = torch.tensor([r for r, _, _ in prompts])
        boxes = bins_to_canvas(
            torch.tensor([bins for _, _, bins in prompts]),
            images,
            torch.tensor([m.original_size for m in metas]),
            num_bins=len(self.model.token_ids.loc),
            canvas_size=self.model.canvas_size,
        )
        states = torch.stack([decoded.seg_states[r][position] for r, position, _ in prompts])
        logits, _ = self.model.mask_head(
            self.model.mask_features(pyramid),
            images.to(self.device),
            boxes.to(self.device, self.model.heads_dtype),
            states,
            pixels=pixel_values,
        )
        for (r, position, _), mask in zip(prompts, logits, strict=True):
            masks[r][position] = mask
        return masks

    def _grounded_answer(
        self,
        *,
        answer_ids: Sequence[int],
        log_probs: Sequence[float],
        seg_mask_logits: dict[int, torch.Tensor],
        detections: Detections,
        meta: ImageMeta,
        choices: Sequence[decoding.PointerChoice] = (),
        scene_line: str | None = None,
    ) -> GroundedAnswer:
        """One answer: parse its text, score and mask its boxes, reconcile them with the head.

        A box the pointer chose is the proposal's exact box (its loc tokens are that box in bins) and its
        score is pointer probability x head score; a box the LM wrote is scored by its loc tokens.

        Args:
            answer_ids: the generated ids; log_probs: each one's log-probability as generated.
            seg_mask_logits: position of each `<seg>` in `answer_ids` -> its (r, r) canvas mask logits.
            choices: the pointer's decisions, by `<box>` position in `answer_ids`.
            scene_line: the scene line the LLM read (None: none).
        """
        chosen = {c.position: c for c in choices if c.proposal is not None}
        raw_text = self.processor.decode(answer_ids)
        parsed = self.processor.parse(raw_text, meta)
        groups = find_box_groups(answer_ids, self.model.token_ids)
        aligned = align_boxes(
            parsed.spans, groups, image_size=meta.original_size, num_bins=self.processor.num_bins
        )
        # A parsed box without its token group (cannot happen for text decoded from these ids) gets score 0, no mask.
        scores = [[0.0 if k is None else group_probability(log_probs, groups[k]) for k in row]
                  for row in aligned]  # fmt: skip
        for i, row in enumerate(aligned):
            for j, k in enumerate(row):
                if k is not None and (choice := chosen.get(groups[k].start)) is not None:
                    parsed.spans[i].boxes[j] = choice.box
                    scores[i][j] = choice.probability * choice.head_score
        masks = [  # each mask clipped to its span's (final) box
            [meta.mask_from_canvas(seg_mask_logits[groups[k].seg_position], box=span.boxes[j])
             if k is not None and groups[k].seg else None for j, k in enumerate(row)]
            for span, row in zip(parsed.spans, aligned, strict=True)
        ]  # fmt: skip
        matched = reconcile(
            parsed.spans,
            box_scores=scores,
            detections=detections,
            masks=masks,
            iou_threshold=self.model.config.heads.match_iou,
        )
        return GroundedAnswer(
            text=parsed.text,
            raw_text=raw_text,
            spans=matched.spans,
            detections=detections,
            image_size=meta.original_size,
            agreement=matched.agreement,
            num_dropped_groups=parsed.num_dropped,
            scene_line=scene_line,
        )
