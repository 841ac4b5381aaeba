"""What each stage trains, and its extra losses: KL to the adapter-disabled model, old-class head distillation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.chat_metrics import token_kl
from ..modeling import GroundedLlavaForConditionalGeneration
from ..modeling.base import adapters_disabled
from ..modeling.outputs import GroundedLlavaOutput
from ..processor import GroundedBatch

# Parameter groups, by what their names contain (peft injects "lora_" and "trainable_tokens_delta").
_DETECTOR = ("neck.", "detection_head.", "spatial_prior.")
_HEADS = ("mask_head.", "attribute_head.")
_POINTER = ("pointer.",)  # `<box>` -> proposal: trains wherever grounded answers train the LLM
_REGIONS = ("region_encoder.", "copy_head.")  # the LLM's region-token projector and copy route: train with it
_CHOOSER = ("chooser.",)  # the choice pointer: trains in `chooser` stages only


def _group_of(name: str) -> str:
    if name.startswith(_DETECTOR):
        return "detector"
    if name.startswith(_HEADS):
        return "heads"
    if name.startswith(_POINTER):
        return "pointer"
    if name.startswith(_REGIONS):
        return "regions"
    if name.startswith(_CHOOSER):
        return "chooser"
    if "lora_" in name:
        return "lora"
    if "trainable_tokens_delta" in name:
        return "token_rows"
    if ".vision_tower." in name or ".multi_modal_projector." in name:
        return "vision"
    return "base"


STAGE_GROUPS = {
    "heads": {"detector", "heads", "pointer"},
    "base": {"base", "regions", "pointer"},
    "align": {"detector", "heads", "pointer", "token_rows", "regions"},
    "ground": {"detector", "heads", "pointer", "token_rows", "lora", "regions"},
    "increment": {"detector", "heads", "pointer", "token_rows", "lora", "regions"},
    "chooser": {"chooser"},
}


def set_trainable(
    model: GroundedLlavaForConditionalGeneration,
    kind: str,
    *,
    train_vision: bool = False,
    train_detector: bool = True,
    train_llm: bool = True,
) -> dict[str, int]:
    """Freeze everything but the stage's parameter groups; returns trainable parameter counts per group.

    `base` (tiny bases only) trains the LLM; the others follow DESIGN.md. `train_vision` (tiny bases,
    heads stages) also trains the vision tower + projector: a random-init tower has no visual features.
    `train_detector=False` keeps the neck, spatial prior and Detect as an earlier heads stage left them
    (the "detector" group); SAM's decoder ("heads") and the pointer still train. `train_llm=False` keeps
    LoRA, the token rows and the region projector too: only what reads the LLM learns. `base` trains the
    pointer too: its loss shapes the LLM's hidden states at `<box>` while the whole LLM learns.
    """
    if (kind == "base" or train_vision) and not model.config.is_tiny:
        raise ValueError(
            "training the LLaVA base (`base` stage, train_vision) is meant for the tiny base only"
        )
    groups = STAGE_GROUPS[kind] | ({"vision"} if train_vision else set())
    if not train_detector:
        groups = groups - {"detector"}
    if not train_llm:
        groups = groups - {"lora", "token_rows", "regions"}
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        group = _group_of(name)
        parameter.requires_grad_(group in groups)
        if group in groups:
            counts[group] = counts.get(group, 0) + parameter.numel()
    return counts


def adamw(params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The optimizer of every stage (and of bench/train_step.py's two steps): torch's fused AdamW, one kernel
    over all tensors: ~4x faster than the per-tensor loop on CPU, where the heads bring many small tensors.
    `params`: tensors or parameter groups (their own "lr" wins)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def parameter_groups(model: nn.Module, lr: float, vision_lr_scale: float) -> list[dict]:
    """The trainable parameters as AdamW groups: the vision tower + projector at `lr * vision_lr_scale`."""
    vision, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (vision if _group_of(name) == "vision" else rest).append(parameter)
    groups = [{"params": rest, "lr": lr}]
    if vision:
        groups.append({"params": vision, "lr": lr * vision_lr_scale})
    return groups


def chat_kl_loss(
    model: GroundedLlavaForConditionalGeneration,
    batch: GroundedBatch,
    out: GroundedLlavaOutput,
    is_chat: torch.Tensor,
) -> torch.Tensor:
    """Mean KL(adapter-disabled || model) over the answer tokens of the chat samples (0 if none).

    `out`: the training forward's output (its `answer_logits` at `answer_mask`). The reference is the same
    network with LoRA and the trainable token rows switched off (peft's `disable_adapter()`), i.e. the base
    LLaVA whose chat ability the stage must keep.
    """
    logits = out.answer_logits
    rows = is_chat.nonzero().flatten()
    if rows.numel() == 0:
        return logits.sum() * 0.0
    chat = batch.select(rows.cpu())
    with torch.no_grad(), adapters_disabled(model.llava):
        reference = model(
            input_ids=chat.input_ids.to(logits.device),
            attention_mask=chat.attention_mask.to(logits.device),
            pixel_values=None if chat.pixel_values is None else chat.pixel_values.to(logits.device),
            image_sample_index=chat.image_sample_index.to(logits.device),
            original_sizes=chat.original_sizes,
            compute_masks=False,
        ).logits
    # Position t predicts token t+1: compare where the next token is a supervised answer token.
    answer_rows = out.answer_mask.nonzero()[:, 0]  # the sample of each answer logit, row-major
    of_chat = is_chat.to(logits.device)[answer_rows]
    if not bool(of_chat.any()):
        return logits.sum() * 0.0
    reference_answers = reference[:, :-1][out.answer_mask[rows.to(logits.device)]]
    return token_kl(reference_answers, logits[of_chat]).mean()


class HeadDistiller(nn.Module):
    """Frozen snapshot of the spatial prior + neck + Detect head at the start of an increment stage.

    `loss` keeps the student's outputs for the OLD classes close to the snapshot's on every image:
    BCE of the old-class score logits against the snapshot's probabilities, plus KL of the box (DFL)
    distributions weighted by the snapshot's confidence in any old class.
    """

    def __init__(self, model: GroundedLlavaForConditionalGeneration) -> None:
        super().__init__()
        self.neck = copy.deepcopy(model.neck).eval().requires_grad_(False)
        self.head = copy.deepcopy(model.detection_head).eval().requires_grad_(False)
        prior = model.spatial_prior
        self.spatial_prior = None if prior is None else copy.deepcopy(prior).eval().requires_grad_(False)
        self.num_old_classes = self.head.num_classes

    def loss(
        self,
        image_features: torch.Tensor,
        pixel_values: torch.Tensor | None,
        student: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """image_features (I, N, D) and canvas pixel_values (I, 3, S, S) of the student's images."""
        with torch.no_grad():
            dtype = self.neck.input_proj[0].weight.dtype
            prior = None if self.spatial_prior is None else self.spatial_prior(pixel_values.to(dtype))
            teacher = self.head(self.neck(image_features.detach().to(dtype), prior))
        old = self.num_old_classes
        teacher_prob = teacher["scores"].float().sigmoid()  # (I, old, A)
        # BCE against soft targets minus the targets' own entropy = KL per logit (0 when the outputs
        # agree; same gradient as BCE). Normalised like ultralytics' classification loss (sum / total
        # target score), so that its scale matches the detection loss that pushes old-class scores
        # down on new-class images.
        bce = F.binary_cross_entropy_with_logits(
            student["scores"][:, :old].float(), teacher_prob, reduction="none"
        )
        entropy = F.binary_cross_entropy(teacher_prob, teacher_prob, reduction="none")
        cls = (bce - entropy).sum() / teacher_prob.sum().clamp(min=1.0)
        images, channels, anchors = student["boxes"].shape
        reg_max = channels // 4
        student_log = student["boxes"].float().view(images, 4, reg_max, anchors).log_softmax(2)
        teacher_log = teacher["boxes"].float().view(images, 4, reg_max, anchors).log_softmax(2)
        box_kl = (teacher_log.exp() * (teacher_log - student_log)).sum(2).mean(1)  # (I, A)
        weight = teacher_prob.max(1).values
        box = (weight * box_kl).sum() / weight.sum().clamp(min=1e-6)
        return cls + box
