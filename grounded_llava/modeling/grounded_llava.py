"""`GroundedLlavaForConditionalGeneration`: LLaVA (+LoRA) composed with a vision neck, a YOLO head and SAM's decoder.

The vision tower runs once per image; its projected features feed both the LLM (through LLaVA's
own `mm_encoder_outputs` input) and the heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import GroundedLlavaConfig
from ..grammar import box_groups_in_ids
from ..tokenizer import GroundingTokenIds
from .base import adapters_merged, extend_trainable_rows, merge_adapters, unmerge_adapters
from .copy_head import language_logits
from .detection import DetectionTargets
from .heads import OPTIONAL_PARTS, build_heads
from .heads_step import heads_losses
from .lm_loss import answer_positions, language_loss, phrase_token_weights
from .outputs import GroundedLlavaOutput
from .pointer import ProposalPointer, Proposals
from .prompts import answer_pointer_loss, seg_prompts
from .region_feedback import embeddings_with_feedback


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class GroundedLlavaForConditionalGeneration(nn.Module):
    """Composed from parts passed in (build them with `grounded_llava.modeling.builder`).

    Args:
        config: the model's config.
        llava: a peft `PeftModel` wrapping a transformers `LlavaForConditionalGeneration` (LoRA on the LLM).
        token_ids: ids of the grounding tokens in the tokenizer the model was built with.
        image_token_id / num_image_tokens / grid_size / canvas_size: from the vision tower.
    """

    def __init__(
        self,
        *,
        config: GroundedLlavaConfig,
        llava: PeftModel,
        token_ids: GroundingTokenIds,
        num_image_tokens: int,
        grid_size: int,
        canvas_size: int,
        patch_size: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.llava = llava
        self.token_ids = token_ids
        self.num_image_tokens = num_image_tokens
        self.canvas_size = canvas_size
        text_hidden = self.base_llava.config.get_text_config().hidden_size
        parts = build_heads(
            config.heads,
            region_tokens=config.region_tokens,
            copy_head=config.copy_head,
            num_classes=max(len(config.heads.categories), 1),
            text_hidden_size=text_hidden,
            grid_size=grid_size,
            canvas_size=canvas_size,
            patch_size=patch_size,
        )
        self.neck, self.detection_head = parts["neck"], parts["detection_head"]
        self.mask_head, self.pointer = parts["mask_head"], parts["pointer"]
        for name in OPTIONAL_PARTS:  # optional parts (ModuleDict has no .get)
            setattr(self, name, parts[name] if name in parts else None)  # noqa: SIM401
        self.mask_level = 0 if config.heads.mask_from_finest else 1
        self.processor = None  # set by from_config / from_pretrained (a GroundedProcessor)

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_config(cls, config: GroundedLlavaConfig) -> GroundedLlavaForConditionalGeneration:
        """A new model (base, LoRA, fresh heads); its processor is `model.processor`."""
        from .checkpoint import build_model

        model, processor = build_model(config)
        model.processor = processor
        return model

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, is_trainable: bool = False
    ) -> GroundedLlavaForConditionalGeneration:
        """Load a checkpoint directory written by `save_pretrained`; its processor is `model.processor`."""
        from .checkpoint import load_pretrained

        model, processor = load_pretrained(directory, is_trainable=is_trainable)
        model.processor = processor
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config, tokenizer/processor, adapter, heads (and base weights for the tiny base), atomically."""
        from .checkpoint import save_pretrained

        if self.processor is None:
            raise ValueError("the model has no processor: build it with from_config/from_pretrained")
        if not adapters_merged(self.llava):
            return save_pretrained(self, self.processor, directory)
        unmerge_adapters(self.llava)  # a predictor merged them: the checkpoint stores base and adapters apart
        try:
            return save_pretrained(self, self.processor, directory)
        finally:
            merge_adapters(self.llava)

    def add_chooser(self) -> ProposalPointer:
        """A fresh choice pointer (replacing any): decoding then takes "none" from `pointer`, the proposal from it."""
        self.chooser = self.pointer.fresh_copy(reads="words")
        self.config.heads.chooser = True
        return self.chooser

    def add_categories(self, names: list[str]) -> None:
        """Append detection categories (incremental stages): the class branch grows, old rows are kept, and
        and (tiny bases) the token rows of the new names become trainable beside the grounding tokens'."""
        new = [n for n in names if n not in self.config.heads.categories]
        self.config.heads.categories = [*self.config.heads.categories, *new]
        self.detection_head.grow_classes(len(self.config.heads.categories))
        if self.region_encoder is not None:
            self.region_encoder.grow_classes(len(self.config.heads.categories))
        if new and self.processor is not None and self.config.is_tiny:  # a small LM never saw their words
            encode = self.processor.tokenizer.encode
            words = [t for n in new for text in (n, f" {n}") for t in encode(text, add_special_tokens=False)]
            extend_trainable_rows(self.llava, words)

    # ------------------------------------------------------------------ parts
    @property
    def base_llava(self):
        """The transformers `LlavaForConditionalGeneration` (adapter layers injected in place by peft)."""
        return self.llava.get_base_model()

    @property
    def image_token_id(self) -> int:
        return int(self.base_llava.config.image_token_id)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of everything outside LLaVA: neck, Detect head, SAM decoder, `<seg>` MLP."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llava.")}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) normalised canvas pixels -> (I, N, D) projected image features (D = LLM hidden size)."""
        llava = self.base_llava
        vision_dtype = llava.model.vision_tower.get_input_embeddings().weight.dtype
        output = llava.model.get_image_features(
            pixel_values=pixel_values.to(vision_dtype),
            vision_feature_layer=llava.config.vision_feature_layer,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        )
        return torch.stack(list(output.pooler_output))

    def llm_image_tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        """(I, N, D) projected features -> (I, N', D) the LLM's image tokens: the patch grid average-pooled
        `config.image_token_pool` x `config.image_token_pool` (row-major), or unchanged when 1."""
        pool = self.config.image_token_pool
        if pool == 1:
            return image_features
        count, _, dim = image_features.shape
        grid = self.neck.grid_size
        maps = image_features.transpose(1, 2).reshape(count, dim, grid, grid)
        return F.avg_pool2d(maps, pool).flatten(2).transpose(1, 2)

    def mm_encoder_outputs(
        self, image_features: torch.Tensor, region_tokens: torch.Tensor | None = None
    ) -> dict[str, BaseModelOutputWithPooling]:
        """Pre-computed image features (I, N, D) (+ (I, K, D) region tokens after them, when the config has
        `region_tokens`), as LLaVA's forward accepts them instead of pixel values."""
        tokens = self.llm_image_tokens(image_features)
        if (region_tokens is None) != (self.region_encoder is None):
            raise ValueError("region tokens must be given exactly when the config has region_tokens")
        if region_tokens is not None:
            tokens = torch.cat([tokens, region_tokens.to(tokens.dtype)], dim=1)
        return {"image": BaseModelOutputWithPooling(pooler_output=list(tokens))}

    def region_tokens(self, region_map: torch.Tensor, proposals: Proposals) -> torch.Tensor | None:
        """(I, K, D) the LLM's region tokens of `proposals` pooled from `region_map` (`pointer_features`),
        None without `config.region_tokens`."""
        if self.region_encoder is None:
            return None
        return self.region_encoder(region_map, proposals)

    def _check_image_tokens(self, input_ids: torch.Tensor, image_sample_index: torch.Tensor) -> None:
        counts = (input_ids == self.image_token_id).sum(1)
        expected = torch.zeros_like(counts)
        expected[image_sample_index] = self.num_image_tokens
        if not torch.equal(counts, expected):
            bad = (counts != expected).nonzero().flatten().tolist()
            raise ValueError(
                f"image-token count mismatch in sample(s) {bad}: found {counts[bad].tolist()} image tokens, "
                f"expected {expected[bad].tolist()} ({self.num_image_tokens} per image)"
            )

    # ------------------------------------------------------------------ heads
    @property
    def heads_dtype(self) -> torch.dtype:
        return self.neck.input_proj[0].weight.dtype

    def image_pyramid(
        self, image_features: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """(I, N, D) projected features (+ (I, 3, S, S) canvas pixels for the spatial prior) -> the neck's
        maps [(I, C, 2g, 2g), (I, C, g, g), (I, C, g/2, g/2)] at strides patch/2, patch, 2*patch."""
        prior = None
        if self.spatial_prior is not None:
            if pixel_values is None:
                raise ValueError(
                    "this model's neck needs the canvas pixels (spatial_prior): pass pixel_values"
                )
            prior = self.spatial_prior(pixel_values.to(self.heads_dtype))
        return self.neck(image_features.to(self.heads_dtype), prior)

    def mask_features(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """The pyramid level SAM decodes from."""
        return pyramid[self.mask_level]

    def pointer_features(
        self, pyramid: list[torch.Tensor], pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """The map the pointer pools regions from: the finest neck level (I, C, 2g, 2g) and the canvas pixels
        averaged to its resolution (I, 3, 2g, 2g), concatenated: the colour of a region stays legible."""
        level = pyramid[0]
        if pixel_values is None:
            colour = level.new_zeros((level.shape[0], 3, *level.shape[-2:]))
        else:
            colour = F.adaptive_avg_pool2d(pixel_values.to(level.dtype), level.shape[-2:])
        return torch.cat([level, colour], dim=1)

    @torch.no_grad()
    def proposals(self, detections: dict[str, torch.Tensor]) -> Proposals:
        """The head's class-agnostic proposals (top `heads.max_proposals` after NMS), canvas pixels."""
        heads = self.config.heads
        rows = self.detection_head.postprocess(
            detections,
            conf_threshold=0.001,
            iou_threshold=heads.proposal_nms_iou,
            max_det=heads.max_proposals,
            agnostic=True,
        )
        return Proposals.from_detections([r.float() for r in rows], heads.max_proposals)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sample_index: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        det_targets: DetectionTargets | None = None,
        seg_masks: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        pyramid: list[torch.Tensor] | None = None,
        compute_masks: bool = True,
        mask_prompts: dict[str, torch.Tensor] | None = None,
        pointer_shapes_llm: bool = True,
    ) -> GroundedLlavaOutput:
        """Teacher-forced pass over the whole sequence; without `input_ids`, the heads stage's step
        (`heads_step.heads_losses`, routed here so DDP sees it).

        Args:
            input_ids, attention_mask: (B, T). labels: (B, T), -100 where not supervised.
            pixel_values: (I, 3, S, S) for the I samples that have an image, in sample order;
                `image_sample_index` (I,) their sample rows; `original_sizes` (I, 2) (W, H).
            det_targets: Detect-head ground truth for the images (see `DetectionTargets`).
            seg_masks: (M, r, r) {0, 1} canvas-frame targets, one per `<seg>` in reading order.
            image_features: (I, N, D) from `encode_images`, pyramid: from `image_pyramid` (inference reuse).
            compute_masks: run the mask decoder for the `<seg>` tokens of the sequence.
            pointer_shapes_llm: False reads the hidden states detached for the pointer loss (the pointer
                learns, the LLM is not pulled by it).
        With `labels` and images, the `<box>` groups of the answers also train the proposal pointer.
        """
        if input_ids is None:
            if pixel_values is None or det_targets is None or mask_prompts is None:
                raise ValueError(
                    "without input_ids, forward is the heads step: pass pixel_values, det_targets, mask_prompts"
                )
            return heads_losses(self, pixel_values=pixel_values, det_targets=det_targets, **mask_prompts)
        batch = input_ids.shape[0]
        if image_sample_index is None:
            image_sample_index = torch.arange(
                batch if pixel_values is not None else 0, device=input_ids.device
            )
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        self._check_image_tokens(input_ids, image_sample_index.to(input_ids.device))

        out = GroundedLlavaOutput(image_features=image_features, pyramid=pyramid)
        groups = None  # the one reading of the grammar, parsed once and only where something needs it
        if image_features is not None or (labels is not None and self.config.loss.lm_phrase != 1.0):
            groups = box_groups_in_ids(input_ids, self.token_ids)
        encoder_outputs, llm_input = None, {"input_ids": input_ids}
        if image_features is not None:
            regions = None
            if self.region_encoder is not None:  # the LLM reads the head's proposals: the heads run first
                out.pyramid = out.pyramid or self.image_pyramid(image_features, pixel_values)
                out.detections = self.detection_head(out.pyramid)
                out.proposals = self.proposals(out.detections)
                regions = self.region_tokens(self.pointer_features(out.pyramid, pixel_values), out.proposals)
            encoder_outputs = self.mm_encoder_outputs(image_features, regions)
            if self.config.region_feedback:
                llm_input = {"inputs_embeds": embeddings_with_feedback(
                    self, input_ids, groups, regions, out.proposals, image_sample_index, original_sizes
                )}  # fmt: skip
        llava = self.base_llava
        llm_out = llava.model(
            **llm_input,
            attention_mask=attention_mask,
            mm_encoder_outputs=encoder_outputs,
            use_cache=False,
        )
        out.last_hidden_state = hidden = llm_out.last_hidden_state
        losses = []
        if labels is not None:
            # The LM head and its softmax run where an answer token is predicted, not over the whole prompt
            # (training only: evaluation and decoding read `logits` everywhere; E34).
            out.answer_mask = answer_positions(labels)
            if self.training:
                out.answer_logits = language_logits(self, hidden, input_ids, attention_mask, out.answer_mask)
            else:
                out.logits = language_logits(self, hidden, input_ids, attention_mask)
                out.answer_logits = out.logits[:, :-1][out.answer_mask]
            weights = (
                None
                if groups is None
                else phrase_token_weights(groups, labels.shape, self.config.loss.lm_phrase)
            )
            out.lm_loss = language_loss(out.answer_logits, labels, weights)
            losses.append(self.config.loss.lm * out.lm_loss)
        else:
            out.logits = language_logits(self, hidden, input_ids, attention_mask)
        if image_features is None:
            out.loss = sum(losses) if losses else None
            return out

        # Training computes the losses of the heads that train (a `base` stage trains the LLM alone).
        run_det = det_targets is not None and bool(det_targets.image_has_targets.any())
        run_det = run_det and (not self.training or _trains(self.detection_head))
        has_groups = groups.rows.numel() > 0
        run_pointer = has_groups and (not self.training or _trains(self.pointer))
        if self.training:
            has_seg = has_groups or groups.stray_seg.numel() > 0  # a stray <seg> still raises below
            compute_masks = compute_masks and has_seg and _trains(self.mask_head)
        if self.training and out.pyramid is None and not (run_det or run_pointer or compute_masks):
            out.loss = sum(losses) if losses else None  # e.g. a chat batch: no head to train
            return out
        out.pyramid = out.pyramid or self.image_pyramid(image_features, pixel_values)
        if out.detections is None:
            out.detections = self.detection_head(out.pyramid)
        if run_det:
            out.det_loss = self.detection_head.loss(out.detections, det_targets.to(hidden.device))
            losses.append(self.config.loss.det * out.det_loss)
        if run_pointer and labels is not None and original_sizes is not None:
            query_states = hidden if pointer_shapes_llm else hidden.detach()
            out.pointer_loss, out.pointer_accuracy = answer_pointer_loss(
                self, groups, labels, query_states, image_sample_index, original_sizes, out, pixel_values
            )
            if out.pointer_loss is not None:
                losses.append(self.config.loss.pointer * out.pointer_loss)
        if compute_masks:
            prompts = seg_prompts(
                groups, hidden, image_sample_index, original_sizes,
                num_bins=len(self.token_ids.loc), canvas_size=self.canvas_size,
            )  # fmt: skip
            box_only = None
            if self.training and self.config.heads.box_only_prompt_rate > 0:
                box_only = (
                    torch.rand(prompts[0].shape[0], device=hidden.device)
                    < self.config.heads.box_only_prompt_rate
                )
            prediction = self.mask_head.predict(
                self.mask_features(out.pyramid), *prompts, box_only=box_only, pixels=pixel_values
            )
            out.mask_logits, out.mask_scores = self.mask_head.on_canvas(prediction), prediction.iou
            out.seg_image_index = prompts[0]
            if seg_masks is not None and seg_masks.shape[0] != out.mask_logits.shape[0]:
                raise ValueError(
                    f"{seg_masks.shape[0]} mask targets for {out.mask_logits.shape[0]} <seg> tokens in the batch"
                )
            if seg_masks is not None and seg_masks.shape[0] > 0:
                out.mask_loss = self.mask_head.loss(
                    prediction,
                    seg_masks.to(out.mask_logits.device),
                    bce_weight=self.config.loss.mask_bce,
                    dice_weight=self.config.loss.mask_dice,
                )
                losses.append(out.mask_loss)
        out.loss = sum(losses) if losses else None
        return out
