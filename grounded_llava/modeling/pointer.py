"""`ProposalPointer`: a `<box>` chooses among the detection head's proposals (as Groma and ChatRex do).

When the model writes `<box>`, the LLM hidden state at that position (the state that predicts the first
`<loc_k>`) and the hidden states of the phrase it grounds are read, with an embedding of every
class-agnostic proposal of its image (neck features and canvas colour pooled in the box + box geometry +
the head's score) and a learned "none" option, by a small transformer that scores each option. The chosen proposal's box is then written as the group's
four `<loc_k>` tokens; "none" leaves them to the LM.

Frames: proposal boxes are xyxy canvas pixels (S, S); region features come from the stride-`stride` map.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    boxes = proposals.boxes.to(feature_map.dtype)
    rois = torch.cat(
        [torch.arange(count, device=boxes.device, dtype=boxes.dtype).repeat_interleave(k)[:, None],
         boxes.reshape(-1, 4)], dim=1)  # fmt: skip
    pooled = roi_align(feature_map, rois, output_size=pool, spatial_scale=1.0 / stride, aligned=True)
    norm = boxes / canvas_size
    size = (norm[..., 2:] - norm[..., :2]).clamp(min=1e-4)
    geometry = torch.cat(
        [norm, (norm[..., :2] + norm[..., 2:]) / 2, size, proposals.scores.to(norm.dtype)[..., None]], dim=-1
    )
    return pooled.flatten(1).view(count, k, -1), geometry


@dataclass
class PointerQueries:
    """M `<box>` queries, each read with its phrase (`prompts.pointer_query` in training, the decoder's
    phrase states in generation). `box_states` (M, D): the LLM's last hidden state at each `<box>`;
    `phrase_states` (M, L, D): the last hidden states of its phrase's tokens, padded; `phrase_mask` (M, L):
    True on real tokens (a row of False: a group in no phrase)."""

    box_states: torch.Tensor
    phrase_states: torch.Tensor
    phrase_mask: torch.Tensor

    def __len__(self) -> int:
        return self.box_states.shape[0]

    def __getitem__(self, index: torch.Tensor) -> PointerQueries:
        return PointerQueries(self.box_states[index], self.phrase_states[index], self.phrase_mask[index])


class ProposalPointer(nn.Module):
    """Scores (M,) queries against their images' K proposals + "none": logits (M, K + 1), "none" last.

    Each query is a small transformer over its `<box>` state, its phrase's token states, the K region
    embeddings of its image and a "none" token: regions see each other and the phrase, so relations and
    superlatives ("the leftmost circle", "the star left of the red square") are decidable, not only the
    attributes of one region. A linear score of each region's (and "none"'s) output is its logit.
    Proposals taken by an earlier box of the phrase stay visible, flagged, and cannot be chosen again.
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
        layers: int = 2,
        heads: int = 4,
        max_phrase_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.canvas_size = canvas_size
        self.stride = stride
        self.pool = pool
        self.max_phrase_tokens = max_phrase_tokens
        self.region = nn.Sequential(
            nn.Linear(channels * pool * pool, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.geometry = nn.Sequential(nn.Linear(9, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text = nn.Sequential(nn.Linear(text_hidden_size, dim), nn.LayerNorm(dim))
        self.positions = nn.Parameter(torch.randn(max_phrase_tokens + 1, dim) * 0.02)  # 0: the `<box>`
        self.kinds = nn.Parameter(torch.randn(3, dim) * 0.02)  # text, region, "none"
        self.none = nn.Parameter(torch.randn(dim) * 0.02)
        self.taken = nn.Parameter(torch.randn(dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.score = nn.Linear(dim, 1)

    def region_embeddings(self, feature_map: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        """(I, C, h, w) neck map at `stride` + proposals -> (I, K, dim) region embeddings."""
        pooled, geometry = region_inputs(
            feature_map, proposals, pool=self.pool, stride=self.stride, canvas_size=self.canvas_size
        )
        return self.region(pooled) + self.geometry(geometry)

    def forward(
        self,
        queries: PointerQueries,
        query_image: torch.Tensor,
        regions: torch.Tensor,
        valid: torch.Tensor,
        excluded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pointer logits (M, K + 1); padding and `excluded` (M, K) proposals get -inf, "none" never does.

        Args:
            queries: M `<box>` queries; query_image: (M,) the image of each; regions: (I, K, dim) the
                `region_embeddings` of the images; valid: (I, K).
            excluded: (M, K) proposals already chosen by an earlier box of the same phrase.
        """
        count, k = len(query_image), regions.shape[1]
        taken = excluded if excluded is not None else valid.new_zeros((count, k))
        blocked = torch.cat([~valid[query_image] | taken, taken.new_zeros((count, 1))], dim=1)
        if count == 0:
            return regions.new_zeros((0, k + 1)).float()
        length = self.max_phrase_tokens
        phrase_mask = queries.phrase_mask[:, :length]
        text = torch.cat([queries.box_states[:, None], queries.phrase_states[:, :length]], dim=1)
        text = self.text(text.to(regions.dtype)) + self.positions[: text.shape[1]] + self.kinds[0]
        options = regions[query_image] + self.kinds[1] + taken[..., None].to(regions.dtype) * self.taken
        none = (self.none + self.kinds[2]).expand(count, 1, -1)
        always = phrase_mask.new_zeros((count, 1))
        padding = torch.cat([always, ~phrase_mask, ~valid[query_image], always], dim=1)
        states = self.encoder(torch.cat([text, options, none], dim=1), src_key_padding_mask=padding)
        logits = self.score(states[:, -(k + 1) :])[..., 0]
        return logits.float().masked_fill(blocked, float("-inf"))


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
