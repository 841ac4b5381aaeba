"""What a training step feeds the model (`model_kwargs`), and the stages' evaluation hook."""

from __future__ import annotations

import torch

from ..data.dataset import GroundedCollator, GroundedDataset, TrainingBatch
from ..modeling import GroundedLlavaForConditionalGeneration
from .heads_data import HeadsDataset, collate_heads


def model_kwargs(
    batch: TrainingBatch, device: torch.device, *, det_targets: bool = True, pointer: bool = True
) -> dict:
    """The model's inputs on `device`; `det_targets=False` leaves out the Detect targets (no det loss),
    `pointer=False` keeps the pointer loss from pulling on the LLM (`pointer_shapes_llm`)."""
    inputs = batch.model_inputs()
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    moved["det_targets"] = batch.det_targets.to(device) if det_targets else None
    moved["original_sizes"] = batch.batch.original_sizes  # read on the host to place box prompts
    moved["pointer_shapes_llm"] = pointer
    return moved


@torch.no_grad()
def evaluation_losses(
    model: GroundedLlavaForConditionalGeneration,
    datasets: list[GroundedDataset | HeadsDataset],
    *,
    samples: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean losses (`eval_lm_loss`, ...) on a fixed set of `samples` samples, spread over the stage's sources."""
    was_training = model.training
    model.eval()
    per_source = max(1, samples // len(datasets))
    totals: dict[str, list[float]] = {}
    for dataset in datasets:
        for start in range(0, min(per_source, len(dataset)), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, per_source, len(dataset)))]
            if isinstance(dataset, HeadsDataset):
                batch = collate_heads(items)
                prompts = {
                    k: getattr(batch, k).to(device) for k in ("mask_image", "mask_boxes", "mask_targets")
                }
                out = model(pixel_values=batch.pixel_values.to(device), det_targets=batch.det_targets.to(device),
                            mask_prompts=prompts)  # fmt: skip
            else:
                out = model(**model_kwargs(GroundedCollator(model.processor)(items), device))
            for key in ("lm_loss", "det_loss", "mask_loss", "pointer_accuracy"):
                value = getattr(out, key)
                if value is not None:
                    totals.setdefault(f"eval_{key}", []).append(float(value))
    model.train(was_training)
    return {k: sum(v) / len(v) for k, v in totals.items()}
