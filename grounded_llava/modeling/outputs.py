"""`GroundedLlavaOutput`: what the grounded model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .pointer import Proposals


@dataclass
class GroundedLlavaOutput(ModelOutput):
    """What `forward` returns. Losses are None when their targets were not given.

    logits: (B, T, V), except in a training forward with labels, which computes only answer_logits: (P, V)
    at the P positions of answer_mask (B, T - 1) (those whose next token is supervised), row-major; an
    evaluation forward with labels gives both. image_features: (I, N, D) projected. pyramid: the neck's maps (see `image_pyramid`).
    detections: the Detect head's raw predictions (see `DetectionHead.forward`); proposals: their
    class-agnostic top-K (`GroundedLlavaForConditionalGeneration.proposals`), when a head needed them.
    mask_logits: (M, 4g, 4g) canvas-frame logits, one per `<seg>` token in reading order (batch-major);
    mask_scores: (M,) SAM's predicted IoU. seg_image_index: (M,) the image of each mask.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    det_loss: torch.Tensor | None = None
    mask_loss: torch.Tensor | None = None
    pointer_loss: torch.Tensor | None = None
    pointer_accuracy: torch.Tensor | None = None
    attribute_loss: torch.Tensor | None = None
    attribute_accuracy: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    answer_logits: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    pyramid: list[torch.Tensor] | None = None
    detections: dict | None = None
    proposals: Proposals | None = None
    mask_logits: torch.Tensor | None = None
    mask_scores: torch.Tensor | None = None
    seg_image_index: torch.Tensor | None = None
