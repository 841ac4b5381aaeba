"""The `chooser` stage (docs/EXPERIMENTS.md E20, E21): a fresh choice pointer trained on the frozen model.

The vision tower and the heads run once, without gradients and in eval mode (as they decode), over
the stage's grounding samples; the LLM does not run. Every answer `<box>` whose target the head proposes
(IoU >= 0.5) is cached: its phrase's words (the mean input embedding of its tokens: what the chooser
reads), the pooled regions and geometry of its image's proposals, the options it has (valid, not taken
by an earlier box of its phrase) and its positives. The choice pointer then trains on the cache alone
for `epochs` passes (seconds each). In the LLM stages the pointer sees about ten queries a step on
hidden states that keep moving and underfits (E15, E20); here it fits what the finished model gives
it, on far more queries: a step costs the vision tower alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.dataset import TrainingBatch
from ..grammar import box_groups_in_ids
from ..modeling import GroundedLlavaForConditionalGeneration
from ..modeling.pointer import ProposalPointer, pointer_loss, region_inputs
from ..modeling.prompts import answer_pointer_batch

MINIBATCH = 64  # cached queries per update
HELD_OUT = 0.1  # of the cached queries, kept out of training to report the chooser's accuracy


@dataclass
class ChoiceCache:
    """M cached `<box>` queries over the K proposal slots of I images: queries (M, D) the phrase's words
    (the chooser `reads` "words": `BoxQueries.word_queries`), images (M,) long the image of each query,
    pooled (I, K, P) and geometry (I, K, 9) the images' proposals (`region_inputs`, stored once per image
    however many queries it has), blocked (M, K) bool (padding or taken), positives (M, K) bool."""

    queries: torch.Tensor
    images: torch.Tensor
    pooled: torch.Tensor
    geometry: torch.Tensor
    blocked: torch.Tensor
    positives: torch.Tensor

    def __len__(self) -> int:
        return len(self.queries)

    def rows(self, index: torch.Tensor, device: torch.device | None = None) -> ChoiceCache:
        """The queries `index` with the regions of their images alone (re-indexed)."""
        used, images = torch.unique(self.images[index], return_inverse=True)
        return ChoiceCache(
            self.queries[index].to(device), images.to(device), self.pooled[used].to(device),
            self.geometry[used].to(device), self.blocked[index].to(device), self.positives[index].to(device),
        )  # fmt: skip

    def targets(self) -> torch.Tensor:
        """(M, K + 1) the positives as `pointer_loss` takes them ("none" never one)."""
        return torch.cat([self.positives, self.positives.new_zeros((len(self), 1))], dim=1)

    @classmethod
    def concat(cls, parts: list[ChoiceCache]) -> ChoiceCache:
        """One cache of `parts` in order (each part's image indices shifted past the earlier parts')."""
        offsets = torch.tensor([0, *(len(p.pooled) for p in parts[:-1])]).cumsum(0)
        return cls(
            torch.cat([p.queries for p in parts]),
            torch.cat([p.images + offset for p, offset in zip(parts, offsets.tolist(), strict=True)]),
            torch.cat([p.pooled for p in parts]), torch.cat([p.geometry for p in parts]),
            torch.cat([p.blocked for p in parts]), torch.cat([p.positives for p in parts]),
        )  # fmt: skip


@torch.no_grad()
def cache_choice_queries(
    model: GroundedLlavaForConditionalGeneration,
    batches: Iterable[TrainingBatch],
    device: torch.device,
    *,
    total: int,
    desc: str,
) -> ChoiceCache:
    """Cache the `<box>` queries of `total` batches that have a proposal target (the choice; whether a
    box is "none" stays the stop pointer's job). The LLM does not run: the chooser reads the phrase's
    words, and only the vision tower and the heads see the images."""
    was_training = model.training
    model.eval()
    pointer, embed, parts = model.pointer, model.base_llava.get_input_embeddings(), []
    for batch in tqdm(batches, total=total, desc=desc):
        grounded = batch.batch
        if grounded.pixel_values is None:
            continue
        input_ids, pixel_values = grounded.input_ids.to(device), grounded.pixel_values.to(device)
        pyramid = model.image_pyramid(model.encode_images(pixel_values), pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        found = answer_pointer_batch(
            model, box_groups_in_ids(input_ids, model.token_ids), grounded.labels.to(device),
            grounded.image_sample_index.to(device), grounded.original_sizes, proposals,
            model.pointer_features(pyramid, pixel_values),
        )  # fmt: skip
        if found is None:
            continue
        pooled, geometry = region_inputs(
            found.region_map,
            proposals,
            pool=pointer.pool,
            stride=pointer.stride,
            canvas_size=pointer.canvas_size,
        )
        keep = found.positives[:, :-1].any(1)
        used, images = torch.unique(found.images[keep], return_inverse=True)
        parts.append(ChoiceCache(
            queries=found.boxes.word_queries(embed(input_ids))[keep].float().cpu(),
            images=images.cpu(),
            pooled=pooled[used].float().cpu(),
            geometry=geometry[used].float().cpu(),
            blocked=(~proposals.valid[found.images[keep]] | found.excluded[keep]).cpu(),
            positives=found.positives[keep, :-1].cpu(),
        ))  # fmt: skip
    model.train(was_training)
    if not parts:
        raise ValueError(f"{desc}: no answer <box> of the stage's data has a proposal target to learn from")
    return ChoiceCache.concat(parts)


def choice_logits(chooser: ProposalPointer, cache: ChoiceCache) -> torch.Tensor:
    """(M, K + 1) the chooser's logits of cached queries; blocked proposals and "none" at -inf."""
    regions = chooser.embed(cache.pooled, cache.geometry)
    excluded = torch.cat([cache.blocked, cache.blocked.new_ones((len(cache), 1))], dim=1)
    valid = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)  # padding: in `blocked`
    logits = chooser(cache.queries, cache.images, regions, valid, cache.blocked)
    return logits.masked_fill(excluded, float("-inf"))


def train_chooser(
    chooser: ProposalPointer,
    cache: ChoiceCache,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    seed: int,
    log: Callable[[int, dict[str, float]], None],
) -> dict[str, float]:
    """`optimizer` (over the chooser) for `epochs` passes of the cache, `log(epoch, metrics)` after each;
    returns the last epoch's metrics: train loss and accuracy, and the accuracy on a held-out tenth of
    the queries (`eval_chooser_accuracy`; their images may recur in training: an optimistic figure)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(cache), generator=generator)
    held = max(1, int(len(cache) * HELD_OUT)) if len(cache) > 1 else 0
    device = chooser.none.device
    held_out, train = cache.rows(order[:held], device), cache.rows(order[held:])
    metrics: dict[str, float] = {}
    chooser.train()
    for epoch in tqdm(range(1, epochs + 1), desc="chooser epochs"):
        losses, accuracies = [], []
        for index in torch.randperm(len(train), generator=generator).split(MINIBATCH):
            part = train.rows(index, device)
            loss, accuracy = pointer_loss(choice_logits(chooser, part), part.targets())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            accuracies.append(float(accuracy))
        metrics = {
            "chooser_loss": sum(losses) / len(losses),
            "chooser_accuracy": sum(accuracies) / len(accuracies),
        }
        if held:
            with torch.no_grad():
                _, accuracy = pointer_loss(choice_logits(chooser, held_out), held_out.targets())
            metrics["eval_chooser_accuracy"] = float(accuracy)
        log(epoch, metrics)
    chooser.eval()
    return metrics
