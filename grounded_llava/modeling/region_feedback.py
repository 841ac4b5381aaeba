"""Region feedback: the region token of the proposal a `<box>` group cites, added to the LLM's input at the
group's `</box>` (config `region_feedback`), so that what follows the box reads the object it names
from the token right before it ("The <p>cross</p><box>..</box> is" -> "green") instead of looking the
object up among the region tokens (a lookup the small LM does not learn; docs/EXPERIMENTS.md E25, E26).

Training (teacher forcing): a group cites the proposal with the best IoU (>= `iou_threshold`) to the box
its four `<loc_k>` tokens write; a group without one gets nothing added. Decoding adds the proposal the
pointer chose (`inference/decoding.py`), and nothing when the LM wrote the box itself ("none").
Frames: group bins are of the ORIGINAL image; proposals are xyxy canvas pixels.
"""

from __future__ import annotations

import torch

from ..grammar import BatchBoxGroups
from .pointer import Proposals
from .prompts import bins_to_canvas, image_of_rows

CLOSE_OFFSET = 5
"""`</box>` sits 5 tokens after its `<box>` (`<box> l0 l1 l2 l3 </box>`)."""


def cited_proposals(
    proposals: Proposals, images: torch.Tensor, boxes: torch.Tensor, *, iou_threshold: float = 0.5
) -> torch.Tensor:
    """(M,) long: for each box (M, 4) xyxy canvas px of image `images` (M,), the valid proposal with the
    best IoU to it when that IoU is >= `iou_threshold`, else -1."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    candidates = proposals.boxes[images].float()  # (M, K, 4)
    boxes = boxes.to(candidates)[:, None]
    top_left = torch.maximum(boxes[..., :2], candidates[..., :2])
    bottom_right = torch.minimum(boxes[..., 2:], candidates[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    candidate_area = (candidates[..., 2:] - candidates[..., :2]).clamp(min=0).prod(-1)
    iou = (inter / (area + candidate_area - inter).clamp(min=1e-6)).masked_fill(
        ~proposals.valid[images], -1.0
    )
    best, index = iou.max(1)
    return torch.where(best >= iou_threshold, index, torch.full_like(index, -1))


def embeddings_with_feedback(
    model,
    input_ids: torch.Tensor,
    groups: BatchBoxGroups,
    regions: torch.Tensor,
    proposals: Proposals,
    image_sample_index: torch.Tensor,
    original_sizes: torch.Tensor | None,
) -> torch.Tensor:
    """(B, T, D) the LLM's input embeddings of `input_ids` (B, T), each `</box>` of a group of an image
    plus the region token (`regions` (I, K, D)) of the proposal the group cites (`cited_proposals`).
    `model`: the grounded model (its embedding table, loc tokens and canvas)."""
    embeddings = model.base_llava.get_input_embeddings()(input_ids)
    images = image_of_rows(input_ids.shape[0], image_sample_index, input_ids.device)[groups.rows]
    keep = images >= 0
    if not bool(keep.any()):
        return embeddings
    if original_sizes is None:
        raise ValueError("region feedback needs original_sizes to place the answer's boxes on the canvas")
    images = images[keep]
    boxes = bins_to_canvas(
        groups.bins[keep], images, original_sizes,
        num_bins=len(model.token_ids.loc), canvas_size=model.canvas_size,
    )  # fmt: skip
    cited = cited_proposals(proposals, images, boxes)
    hit = cited >= 0
    rows, cols = groups.rows[keep][hit], groups.starts[keep][hit] + CLOSE_OFFSET
    added = regions[images[hit], cited[hit]].to(embeddings.dtype)
    return embeddings.index_put((rows, cols), added, accumulate=True)
