"""`GroundedLlavaForConditionalGeneration`: LLaVA (+LoRA) composed with a vision neck, a YOLO head and SAM's decoder.

The vision tower runs once per image; its projected features feed both the LLM (through LLaVA's
own `mm_encoder_outputs` input) and the heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from ..config import GroundedLlavaConfig, HeadSettings
from ..image_meta import ImageMeta
from ..processor import IGNORE_INDEX
from ..tokenizer import GroundingTokenIds
from .detection import DetectionHead, DetectionTargets
from .masks import MaskHead, mask_loss
from .neck import VisionNeck


@dataclass
class GroundedLlavaOutput(ModelOutput):
    """What `forward` returns. Losses are None when their targets were not given.

    logits: (B, T, V). image_features: (I, N, D) projected. detections: the Detect head's raw predictions (see `DetectionHead.forward`).
    mask_logits: (M, 4g, 4g) canvas-frame logits, one per `<seg>` token in reading order (batch-major);
    mask_scores: (M,) SAM's predicted IoU. seg_image_index: (M,) the image of each mask.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    det_loss: torch.Tensor | None = None
    mask_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    detections: dict | None = None
    mask_logits: torch.Tensor | None = None
    mask_scores: torch.Tensor | None = None
    seg_image_index: torch.Tensor | None = None


def build_heads(
    heads: HeadSettings,
    *,
    num_classes: int,
    text_hidden_size: int,
    grid_size: int,
    canvas_size: int,
    patch_size: int,
) -> tuple[VisionNeck, DetectionHead, MaskHead]:
    """The neck (LLM-space image tokens -> pyramid at strides patch/2, patch, 2*patch), the Detect head
    and the SAM mask head, sized from `heads` and the vision tower's geometry."""
    channels = heads.neck_channels
    neck = VisionNeck(in_dim=text_hidden_size, channels=channels, grid_size=grid_size)
    detection = DetectionHead(
        num_classes=num_classes,
        channels=channels,
        strides=(patch_size / 2, float(patch_size), patch_size * 2.0),
        reg_max=heads.reg_max,
        gains=(heads.box_gain, heads.cls_gain, heads.dfl_gain),
    )
    masks = MaskHead(
        channels=channels,
        grid_size=grid_size,
        canvas_size=canvas_size,
        text_hidden_size=text_hidden_size,
        depth=heads.mask_decoder_depth,
        num_heads=heads.mask_decoder_heads,
        mlp_dim=heads.mask_decoder_mlp_dim,
        seg_mlp_hidden=heads.seg_mlp_hidden,
    )
    return neck, detection, masks


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
        self.neck, self.detection_head, self.mask_head = build_heads(
            config.heads,
            num_classes=max(len(config.heads.categories), 1),
            text_hidden_size=text_hidden,
            grid_size=grid_size,
            canvas_size=canvas_size,
            patch_size=patch_size,
        )
        self.processor = None  # set by from_config / from_pretrained (a GroundedProcessor)
        loc = torch.full((int(self.base_llava.get_input_embeddings().weight.shape[0]),), -1, dtype=torch.long)
        loc[list(token_ids.loc)] = torch.arange(len(token_ids.loc))
        self.register_buffer("loc_bin_of_token", loc, persistent=False)

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_config(cls, config: GroundedLlavaConfig) -> GroundedLlavaForConditionalGeneration:
        """A new model (base, LoRA, fresh heads); its processor is `model.processor`."""
        from .pretrained import build_model

        model, processor = build_model(config)
        model.processor = processor
        return model

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, is_trainable: bool = False
    ) -> GroundedLlavaForConditionalGeneration:
        """Load a checkpoint directory written by `save_pretrained`; its processor is `model.processor`."""
        from .pretrained import load_pretrained

        model, processor = load_pretrained(directory, is_trainable=is_trainable)
        model.processor = processor
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config, tokenizer/processor, adapter, heads (and base weights for the tiny base), atomically."""
        from .pretrained import save_pretrained

        if self.processor is None:
            raise ValueError("the model has no processor: build it with from_config/from_pretrained")
        return save_pretrained(self, self.processor, directory)

    def add_categories(self, names: list[str]) -> None:
        """Append detection categories (incremental stages): the class branch grows, old rows are kept."""
        new = [n for n in names if n not in self.config.heads.categories]
        self.config.heads.categories = [*self.config.heads.categories, *new]
        self.detection_head.grow_classes(len(self.config.heads.categories))

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

    @staticmethod
    def mm_encoder_outputs(image_features: torch.Tensor) -> dict[str, BaseModelOutputWithPooling]:
        """Pre-computed image features in the form LLaVA's forward/generate accept instead of pixel values."""
        return {"image": BaseModelOutputWithPooling(pooler_output=list(image_features))}

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

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sample_index: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        det_targets: DetectionTargets | None = None,
        seg_masks: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        compute_masks: bool = True,
    ) -> GroundedLlavaOutput:
        """Teacher-forced pass over the whole sequence.

        Args:
            input_ids, attention_mask: (B, T). labels: (B, T), -100 where not supervised.
            pixel_values: (I, 3, S, S) for the I samples that have an image, in sample order;
                `image_sample_index` (I,) their sample rows; `original_sizes` (I, 2) (W, H).
            det_targets: Detect-head ground truth for the images (see `DetectionTargets`).
            seg_masks: (M, 4g, 4g) {0, 1} canvas-frame targets, one per `<seg>` in reading order.
            image_features: (I, N, D) from `encode_images`, to skip the vision tower (inference reuse).
            compute_masks: run the mask decoder for the `<seg>` tokens of the sequence.
        """
        batch = input_ids.shape[0]
        if image_sample_index is None:
            image_sample_index = torch.arange(
                batch if pixel_values is not None else 0, device=input_ids.device
            )
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        self._check_image_tokens(input_ids, image_sample_index.to(input_ids.device))

        llava = self.base_llava
        llm_out = llava.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_encoder_outputs=self.mm_encoder_outputs(image_features)
            if image_features is not None
            else None,
            use_cache=False,
        )
        hidden = llm_out.last_hidden_state
        logits = llava.lm_head(hidden)
        out = GroundedLlavaOutput(logits=logits, last_hidden_state=hidden, image_features=image_features)
        losses = []
        if labels is not None:
            out.lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            losses.append(self.config.loss.lm * out.lm_loss)
        if image_features is None:
            out.loss = sum(losses) if losses else None
            return out

        pyramid = self.neck(image_features.to(self.neck.input_proj[0].weight.dtype))
        out.detections = self.detection_head(pyramid)
        if det_targets is not None and bool(det_targets.image_has_targets.any()):
            out.det_loss = self.detection_head.loss(out.detections, det_targets.to(hidden.device))
            losses.append(self.config.loss.det * out.det_loss)
        if compute_masks or seg_masks is not None:
            prompts = self._seg_prompts(input_ids, hidden, image_sample_index, original_sizes)
            box_only = None
            if self.training and self.config.heads.box_only_prompt_rate > 0:
                box_only = (
                    torch.rand(prompts[0].shape[0], device=hidden.device)
                    < self.config.heads.box_only_prompt_rate
                )
            out.mask_logits, out.mask_scores = self.mask_head(pyramid[1], *prompts, box_only=box_only)
            out.seg_image_index = prompts[0]
            if seg_masks is not None and seg_masks.shape[0] != out.mask_logits.shape[0]:
                raise ValueError(
                    f"{seg_masks.shape[0]} mask targets for {out.mask_logits.shape[0]} <seg> tokens in the batch"
                )
            if seg_masks is not None and seg_masks.shape[0] > 0:
                out.mask_loss = mask_loss(
                    out.mask_logits,
                    seg_masks.to(out.mask_logits.device),
                    bce_weight=self.config.loss.mask_bce,
                    dice_weight=self.config.loss.mask_dice,
                )
                losses.append(out.mask_loss)
        out.loss = sum(losses) if losses else None
        return out

    def _seg_prompts(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        image_sample_index: torch.Tensor,
        original_sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every `<seg>` token: its image, the box group before it (canvas pixels) and the hidden state.

        As in LISA, the prompt is the last hidden state at the position that predicts `<seg>` (t - 1),
        which generation also has when it emits `<seg>`. The box is read from the four `<loc_k>`
        tokens of the `<box>` group that the `<seg>` follows: `<box> l0 l1 l2 l3 </box> <seg>`.
        """
        rows, cols = (input_ids == self.token_ids.seg).nonzero(as_tuple=True)
        device = hidden.device
        if rows.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, hidden.new_zeros((0, 4)), hidden.new_zeros((0, hidden.shape[-1]))
        image_of_sample = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=device)
        image_of_sample[image_sample_index.to(device)] = torch.arange(
            image_sample_index.numel(), device=device
        )
        images = image_of_sample[rows]
        window = torch.stack([input_ids[rows, (cols - k).clamp(min=0)] for k in range(6, 0, -1)], dim=1)
        bins = self.loc_bin_of_token[window[:, 1:5]]
        valid = (cols >= 6) & (images >= 0) & (bins >= 0).all(1)
        valid &= (window[:, 0] == self.token_ids.box_open) & (window[:, 5] == self.token_ids.box_close)
        if not bool(valid.all()):
            bad = [(int(r), int(c)) for r, c in zip(rows[~valid], cols[~valid], strict=True)]
            raise ValueError(
                f"<seg> token(s) at (sample, position) {bad} do not follow a <box> group of an image"
            )
        if original_sizes is None:
            raise ValueError("original_sizes is needed to place the <seg> box prompts on the canvas")
        fractions = (bins.float() + 0.5) / len(self.token_ids.loc)
        boxes = torch.stack(
            [
                ImageMeta(tuple(original_sizes[i].tolist()), self.canvas_size).fractions_to_canvas(
                    fractions[j]
                )
                for j, i in enumerate(images.tolist())
            ]
        )
        seg_hidden = hidden[rows, cols - 1]
        return images, boxes.float(), seg_hidden
