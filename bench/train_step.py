"""`train_step_ratio`: one grounded train step / one plain LoRA LLaVA step, same tiny config and batch.

- grounded: `GroundedLlavaForConditionalGeneration` with the `ground` stage's trainable groups (LoRA,
  heads, new token rows); forward with the LM, Detect and SAM mask losses, backward, AdamW step.
- plain: a transformers `LlavaForConditionalGeneration` with the same config and base weights, wrapped
  by peft with the same `LoraConfig` (same targets, rank and token rows); LM loss only, backward, AdamW.
Both see the same batch: the same token ids, labels and pixel values (segmentation task samples of the
synthetic world, so that every loss of the grounded model is active).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model

from grounded_llava import GroundedLlavaConfig, GroundedLlavaForConditionalGeneration
from grounded_llava.data import TaskConfig, build_task_samples, generate_world, load_coco_instances
from grounded_llava.data.dataset import GroundedCollator, GroundedDataset, TrainingBatch
from grounded_llava.modeling.base import lora_config_for, peft_wrapping
from grounded_llava.training.stages import adamw, set_trainable

from .latency import plain_llava_like
from .timing import interleaved

CATEGORIES = ["circle", "square", "triangle", "star"]


def segmentation_batch(
    model: GroundedLlavaForConditionalGeneration, world_dir: Path, *, batch_size: int
) -> TrainingBatch:
    """`batch_size` segmentation samples (boxes + `<seg>` masks) of a freshly generated synthetic world."""
    canvas = model.canvas_size
    generate_world(world_dir, num_images=batch_size * 2, seed=7, image_size=canvas, categories=CATEGORIES)
    dataset = load_coco_instances(world_dir / "annotations.json", world_dir / "images")
    samples = build_task_samples(
        dataset, config=TaskConfig(num_bins=model.config.num_bins, weights={"segment": 1.0}), seed=0
    )
    if len(samples) < batch_size:
        raise RuntimeError(f"the synthetic world gave {len(samples)} segmentation samples, need {batch_size}")
    encoded = GroundedDataset(
        samples[:batch_size],
        model.processor,
        categories=model.config.heads.categories,
        mask_resolution=model.mask_head.mask_resolution,
    )
    return GroundedCollator(model.processor)([encoded[i] for i in range(batch_size)])


def train_step(
    *,
    config: GroundedLlavaConfig,
    work_dir: Path,
    batch_size: int,
    repeats: int,
    warmup: int = 1,
    train_detector: bool = True,
) -> dict:
    """Time both train steps interleaved; returns the ratio, the timing and the batch's shape.

    `train_detector=False` times the `ground` step as the default recipe (configs/tiny_shapes.yaml) runs it:
    the spatial prior, neck and Detect stay as the `heads` stage left them (they still run, for the
    proposals the pointer and the region tokens read, but take no Detect loss and no gradient).
    """
    config.heads.categories = list(CATEGORIES)
    torch.manual_seed(0)
    grounded = GroundedLlavaForConditionalGeneration.from_config(config)
    with peft_wrapping():
        plain = get_peft_model(
            plain_llava_like(grounded),
            lora_config_for(config, grounded.base_llava, grounded.token_ids.all_ids),
        )
    batch = segmentation_batch(grounded, work_dir / "train_step_world", batch_size=batch_size)
    inputs = batch.model_inputs()
    if not train_detector:
        inputs["det_targets"] = None  # as the trainer feeds a stage with `train_detector: false`

    trainable = set_trainable(grounded, "ground", train_detector=train_detector)
    grounded.train()
    plain.train()
    # both with the trainer's optimizer (fused AdamW)
    grounded_optimizer = adamw(
        [p for p in grounded.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
    )
    plain_optimizer = adamw([p for p in plain.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def grounded_step() -> None:
        out = grounded(**inputs)
        if out.lm_loss is None or out.mask_loss is None or (out.det_loss is None) == train_detector:
            raise RuntimeError(
                "the grounded step must have LM and mask losses, and a Detect loss if it trains"
            )
        out.loss.backward()
        grounded_optimizer.step()
        grounded_optimizer.zero_grad(set_to_none=True)

    def plain_step() -> None:
        out = plain(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            labels=inputs["labels"],
        )
        out.loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    timing = interleaved(
        {"grounded_step": grounded_step, "plain_lora_step": plain_step}, repeats=repeats, warmup=warmup
    )
    plain_trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    return {
        "ratio": timing.ratio("grounded_step", "plain_lora_step"),
        **timing.to_dict(),
        "batch_size": batch_size,
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "mask_targets": int(batch.seg_masks.shape[0]),
        "box_targets": int(batch.det_targets.class_ids.numel()),
        "trainable_parameters": {"grounded": sum(trainable.values()), "plain_lora": plain_trainable},
    }
