"""`ProposalPointer`: a `<box>` chooses among the detection head's proposals (as Groma and ChatRex do).

When the model writes `<box>`, the LLM hidden state at that position (the state that predicts the first
`<loc_k>`), beside the mean hidden state of the phrase it grounds, is scored against an embedding of
every class-agnostic proposal of its image (neck features pooled in the box + box geometry + the head's
score) and against a learned "none" option. The chosen proposal's box is then written as the group's
four `<loc_k>` tokens; "none" leaves them to the LM.

Frames: proposal boxes are xyxy canvas pixels (S, S); region features come from the stride-`stride` map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.ops import box_iou, roi_align


@dataclass
class Proposals:
    """Class-agnostic proposals of I images, padded to K: `boxes` (I, K, 4) xyxy canvas pixels,
    `scores` (I, K) head confidence, `valid` (I, K) bool (False = padding), `class_ids` (I, K) long the
    head's best class (0 on padding; None when not known)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    class_ids: torch.Tensor | None = None

    @classmethod
    def from_detections(cls, detections: list[torch.Tensor], max_proposals: int) -> Proposals:
        """From per-image (n, >=5) rows [x0, y0, x1, y1, score, class_id, ...] sorted best first (NMS output)."""
        count = len(detections)
        reference = detections[0] if count else torch.zeros(0, 5)
        boxes = reference.new_zeros((count, max_proposals, 4))
        scores = reference.new_zeros((count, max_proposals))
        valid = torch.zeros((count, max_proposals), dtype=torch.bool, device=reference.device)
        class_ids = torch.zeros((count, max_proposals), dtype=torch.long, device=reference.device)
        for i, rows in enumerate(detections):
            n = min(len(rows), max_proposals)
            boxes[i, :n], scores[i, :n], valid[i, :n] = rows[:n, :4], rows[:n, 4], True
            if rows.shape[1] > 5:
                class_ids[i, :n] = rows[:n, 5].long()
        return cls(boxes=boxes, scores=scores, valid=valid, class_ids=class_ids)


SAMPLING_RATIO = 2
"""Bilinear samples per pooled cell and axis. torchvision's adaptive default (ceil(box / pool cells)) is
the same for object-sized boxes on the stride-8 map, but grows with the box: a whole-image box cost ~12x
more, forward and (single-threaded on CPU) backward."""


def region_inputs(
    feature_map: torch.Tensor, proposals: Proposals, *, pool: int, stride: float, canvas_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a region is made of, for the pointer and the LLM's region tokens alike.

    Args:
        feature_map: (I, C, h, w) map at `stride` (canvas pixels per cell); proposals: K per image.
    Returns:
        pooled: (I, K, C * pool * pool) the map roi-aligned in each box; geometry: (I, K, 9) the box as
        canvas fractions (x0, y0, x1, y1, cx, cy, w, h) and the head's score.
    """
    count, k = proposals.valid.shape
    images = torch.arange(count, device=proposals.boxes.device).repeat_interleave(k)
    pooled, geometry = box_regions(
        feature_map, images, proposals.boxes.reshape(-1, 4), proposals.scores.reshape(-1), pool=pool,
        stride=stride, canvas_size=canvas_size,
    )  # fmt: skip
    return pooled.view(count, k, -1), geometry.view(count, k, -1)


def box_regions(
    feature_map: torch.Tensor, images: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, *, pool: int,
    stride: float, canvas_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`region_inputs` of M boxes (M, 4) xyxy canvas px of images `images` (M,) with scores (M,): pooled
    (M, C * pool * pool) and geometry (M, 9)."""
    boxes = boxes.to(feature_map.dtype)
    rois = torch.cat([images.to(boxes.dtype)[:, None], boxes], dim=1)
    pooled = roi_align(
        feature_map, rois, output_size=pool, spatial_scale=1.0 / stride, sampling_ratio=SAMPLING_RATIO,
        aligned=True,
    )  # fmt: skip
    norm = boxes / canvas_size
    size = (norm[:, 2:] - norm[:, :2]).clamp(min=1e-4)
    geometry = torch.cat(
        [norm, (norm[:, :2] + norm[:, 2:]) / 2, size, scores.to(norm.dtype)[:, None]], dim=-1
    )
    return pooled.flatten(1), geometry


class ProposalPointer(nn.Module):
    """Scores (M,) queries against their images' K proposals + "none": logits (M, K + 1), "none" last.

    `reads` is what its queries are: "states" (M, 2 D_text), the `<box>` hidden state beside the phrase's
    mean hidden state (`prompts.pointer_query`); "words" (M, D_text), the mean input embedding of the
    phrase's tokens (the choice pointer: words generalise to unseen images where states let it memorise
    its training images, docs/EXPERIMENTS.md E15, E22).
    """

    def __init__(
        self,
        *,
        channels: int,
        text_hidden_size: int,
        canvas_size: int,
        stride: float,
        dim: int = 128,
        pool: int = 4,
        reads: Literal["states", "words"] = "states",
    ) -> None:
        super().__init__()
        self.shape = {"channels": channels, "text_hidden_size": text_hidden_size, "canvas_size": canvas_size,
                      "stride": stride, "dim": dim, "pool": pool, "reads": reads}  # fmt: skip
        self.reads = reads
        self.canvas_size = canvas_size
        self.stride = stride
        self.pool = pool
        self.region = nn.Sequential(
            nn.Linear(channels * pool * pool, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.geometry = nn.Sequential(nn.Linear(9, dim), nn.GELU(), nn.Linear(dim, dim))
        self.query = nn.Sequential(
            nn.Linear((2 if reads == "states" else 1) * text_hidden_size, dim),
            nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim),
        )  # fmt: skip
        self.none = nn.Parameter(torch.zeros(dim))
        self.scale = dim**-0.5

    def region_embeddings(self, feature_map: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        """(I, C, h, w) neck map at `stride` + proposals -> (I, K, dim) region embeddings."""
        pooled, geometry = region_inputs(
            feature_map, proposals, pool=self.pool, stride=self.stride, canvas_size=self.canvas_size
        )
        return self.embed(pooled, geometry)

    def embed(self, pooled: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """`region_inputs` (..., K, C * pool * pool) and (..., K, 9) -> (..., K, dim) region embeddings."""
        return self.region(pooled) + self.geometry(geometry)

    def fresh_copy(self, **changes) -> ProposalPointer:
        """A newly initialised pointer of the same shape but `changes` (the choice pointer: `reads="words"`)."""
        return type(self)(**(self.shape | changes)).to(self.none.device)

    def forward(
        self,
        query_hidden: torch.Tensor,
        query_image: torch.Tensor,
        regions: torch.Tensor,
        valid: torch.Tensor,
        excluded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pointer logits (M, K + 1); padding and `excluded` (M, K) proposals get -inf, "none" never does.

        Args:
            query_hidden: (M, 2 D_text) or (M, D_text): the queries `reads` names.
            query_image: (M,) the image of each query; regions: (I, K, dim); valid: (I, K).
            excluded: (M, K) proposals already chosen by an earlier box of the same phrase.
        """
        query = self.query(query_hidden.to(regions.dtype))  # (M, dim)
        options = torch.cat([regions[query_image], self.none.expand(len(query), 1, -1)], dim=1)
        logits = torch.einsum("md,mkd->mk", query, options) * self.scale
        blocked = ~valid[query_image]
        if excluded is not None:
            blocked = blocked | excluded
        blocked = torch.cat([blocked, blocked.new_zeros((len(query), 1))], dim=1)
        return logits.float().masked_fill(blocked, float("-inf"))


def pointer_decision(
    stop_logits: torch.Tensor, choice_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each `<box>` query gets: (R,) the option (K = "none") and (R,) its probability.

    With one pointer (`choice_logits` None): the argmax of `stop_logits` (R, K + 1). With a choice pointer
    (docs/EXPERIMENTS.md E21): "none" when it is the stop pointer's argmax, with the stop pointer's
    probability; else the choice pointer's best proposal, with probability (1 - p_none) * p_choice, where
    p_choice is its softmax over the proposals (its own "none" is ignored).
    """
    stop = stop_logits.softmax(-1)
    probability, best = stop.max(-1)
    if choice_logits is None:
        return best, probability
    k = stop.shape[-1] - 1
    none = best == k
    choice = choice_logits[:, :k].softmax(-1).nan_to_num(0.0)  # rows with every proposal blocked: zeros
    choice_probability, chosen = choice.max(-1)
    none = none | (choice_probability == 0)
    best = torch.where(none, torch.full_like(chosen, k), chosen)
    probability = torch.where(none, stop[:, k], (1 - stop[:, k]) * choice_probability)
    return best, probability


def pointer_targets(
    proposals: Proposals,
    query_image: torch.Tensor,
    target_boxes: torch.Tensor,
    phrase: torch.Tensor,
    *,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets, queries in reading order. A phrase's boxes may be listed in any order (decoding
    excludes what the phrase already took), so every query's positives are the proposals with IoU >=
    `iou_threshold` to any of its phrase's boxes not yet listed, among proposals not yet taken; "none"
    (index K) is the positive when there is none. After each query, its own box's best free proposal
    is taken (what teacher forcing writes next is that box).

    Args:
        query_image: (M,) image of each query; target_boxes: (M, 4) xyxy canvas px; phrase: (M,) phrase keys.
    Returns: positives (M, K + 1) bool; excluded (M, K) bool, the proposals taken before each query.
    """
    count, k = len(query_image), proposals.valid.shape[1]
    device = proposals.boxes.device
    positives = torch.zeros((count, k + 1), dtype=torch.bool, device=device)
    excluded = torch.zeros((count, k), dtype=torch.bool, device=device)
    if count == 0:
        return positives, excluded
    images, keys = query_image.tolist(), phrase.tolist()
    members: dict[int, list[int]] = {}
    for m, key in enumerate(keys):
        members.setdefault(key, []).append(m)
    for queries in members.values():
        image = images[queries[0]]
        ious = box_iou(target_boxes[queries].float().to(device), proposals.boxes[image].float())  # (q, K)
        ious = ious.masked_fill(~proposals.valid[image], -1.0)
        taken = torch.zeros(k, dtype=torch.bool, device=device)
        for n, m in enumerate(queries):
            excluded[m] = taken
            free = ious[n:].masked_fill(taken, -1.0)  # the boxes not listed yet, on free proposals
            positives[m, :k] = (free >= iou_threshold).any(0)
            positives[m, k] = not bool(positives[m, :k].any())
            best, index = free[0].max(0)
            if float(best) >= iou_threshold:
                taken = taken.clone()
                taken[index] = True
    return positives, excluded


def pointer_loss(logits: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-positive cross-entropy -log(sum of the positives' probabilities), mean over queries (0 when
    there are none), and the accuracy (the argmax is a positive)."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    log_probs = logits.log_softmax(-1)
    loss = -torch.logsumexp(log_probs.masked_fill(~positives, float("-inf")), dim=-1).mean()
    accuracy = positives.gather(1, logits.argmax(-1, keepdim=True)).float().mean()
    return loss, accuracy.detach()
