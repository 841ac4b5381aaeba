"""`ProposalPointer`: a `<box>` chooses among the detection head's proposals (as Groma and ChatRex do).

When the model writes `<box>`, the LLM hidden state at that position (the state that predicts the first
`<loc_k>`) is scored against an embedding of every class-agnostic proposal of its image (neck features
pooled in the box + box geometry + the head's score) and against a learned "none" option. The chosen
proposal's box is then written as the group's four `<loc_k>` tokens; "none" leaves them to the LM.

Frames: proposal boxes are xyxy canvas pixels (S, S); region features come from the stride-`stride` map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align


@dataclass
class Proposals:
    """Class-agnostic proposals of I images, padded to K: `boxes` (I, K, 4) xyxy canvas pixels,
    `scores` (I, K) head confidence, `valid` (I, K) bool (False = padding)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_detections(cls, detections: list[torch.Tensor], max_proposals: int) -> Proposals:
        """From per-image (n, >=5) rows [x0, y0, x1, y1, score, ...] sorted best first (NMS output)."""
        count = len(detections)
        reference = detections[0] if count else torch.zeros(0, 5)
        boxes = reference.new_zeros((count, max_proposals, 4))
        scores = reference.new_zeros((count, max_proposals))
        valid = torch.zeros((count, max_proposals), dtype=torch.bool, device=reference.device)
        for i, rows in enumerate(detections):
            n = min(len(rows), max_proposals)
            boxes[i, :n], scores[i, :n], valid[i, :n] = rows[:n, :4], rows[:n, 4], True
        return cls(boxes=boxes, scores=scores, valid=valid)


class ProposalPointer(nn.Module):
    """Scores (M,) queries against their images' K proposals + "none": logits (M, K + 1), "none" last."""

    def __init__(
        self,
        *,
        channels: int,
        text_hidden_size: int,
        canvas_size: int,
        stride: float,
        dim: int = 128,
        pool: int = 4,
    ) -> None:
        super().__init__()
        self.canvas_size = canvas_size
        self.stride = stride
        self.pool = pool
        self.region = nn.Sequential(
            nn.Linear(channels * pool * pool, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.geometry = nn.Sequential(nn.Linear(9, dim), nn.GELU(), nn.Linear(dim, dim))
        self.query = nn.Sequential(
            nn.Linear(text_hidden_size, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.none = nn.Parameter(torch.zeros(dim))
        self.scale = dim**-0.5

    def region_embeddings(self, feature_map: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        """(I, C, h, w) neck map at `stride` + proposals -> (I, K, dim) region embeddings."""
        count, k = proposals.valid.shape
        boxes = proposals.boxes.to(feature_map.dtype)
        rois = torch.cat(
            [torch.arange(count, device=boxes.device, dtype=boxes.dtype).repeat_interleave(k)[:, None],
             boxes.reshape(-1, 4)], dim=1)  # fmt: skip
        pooled = roi_align(
            feature_map, rois, output_size=self.pool, spatial_scale=1.0 / self.stride, aligned=True
        )
        norm = boxes / self.canvas_size
        size = (norm[..., 2:] - norm[..., :2]).clamp(min=1e-4)
        geometry = torch.cat(
            [norm, (norm[..., :2] + norm[..., 2:]) / 2, size, proposals.scores.to(norm.dtype)[..., None]],
            dim=-1,
        )
        return self.region(pooled.flatten(1)).view(count, k, -1) + self.geometry(geometry)

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
            query_hidden: (M, D_text) LLM last hidden states at the `<box>` positions.
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


def pointer_targets(
    proposals: Proposals,
    query_image: torch.Tensor,
    target_boxes: torch.Tensor,
    phrase: torch.Tensor,
    *,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets, queries taken in reading order: each query's target is the proposal with the best
    IoU >= `iou_threshold` to its true box among those not taken by an earlier query of the same phrase,
    else "none" (index K). Inference excludes the same way (one object is not listed twice in a phrase).

    Args:
        query_image: (M,) image of each query; target_boxes: (M, 4) xyxy canvas px; phrase: (M,) phrase keys.
    Returns: targets (M,) long in [0, K]; excluded (M, K) bool, the proposals taken before each query.
    """
    count, k = len(query_image), proposals.valid.shape[1]
    targets = torch.full((count,), k, dtype=torch.long, device=proposals.boxes.device)
    excluded = torch.zeros((count, k), dtype=torch.bool, device=proposals.boxes.device)
    taken: dict[int, torch.Tensor] = {}
    for m, (image, key) in enumerate(zip(query_image.tolist(), phrase.tolist(), strict=True)):
        blocked = taken.get(key, torch.zeros(k, dtype=torch.bool, device=excluded.device))
        excluded[m] = blocked
        ious = box_iou(
            target_boxes[m : m + 1].float().to(proposals.boxes.device), proposals.boxes[image].float()
        )[0]
        ious = ious.masked_fill(~proposals.valid[image] | blocked, -1.0)
        best, index = ious.max(0)
        if float(best) >= iou_threshold:
            targets[m] = index
            blocked = blocked.clone()
            blocked[index] = True
        taken[key] = blocked
    return targets, excluded


def pointer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the queries (0 when there are none)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets)
