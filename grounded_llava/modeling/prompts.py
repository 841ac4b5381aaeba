"""Where the heads read the LLM: `<seg>` mask prompts and `<box>` pointer queries (and their loss), from
(B, T) token ids.

A box group is `<box> l0 l1 l2 l3 </box>` (four `<loc_k>` tokens, bins of the ORIGINAL image's
fractions), read by the one grammar reader (`grammar.box_groups_in_ids`); `bins_to_canvas` places it
on the model canvas (xyxy canvas pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grammar import BatchBoxGroups
from ..image_meta import ImageMeta
from .pointer import Proposals, pointer_loss, pointer_targets


@dataclass
class BoxQueries:
    """The supervised `<box>` groups of a batch, in reading order (row-major).

    rows, cols: (M,) sample row and position of each `<box>` token; bins: (M, 4) its loc bins;
    phrase: (M,) a key equal for the groups of one phrase (one row, same count of `</p>` before);
    phrase_starts, phrase_ends: (M,) the phrase's content `[start, end)` in the row (empty: no phrase).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    bins: torch.Tensor
    phrase: torch.Tensor
    phrase_starts: torch.Tensor
    phrase_ends: torch.Tensor

    def pointer_queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last hidden states -> (M, 2D) pointer queries (`pointer_query`)."""
        return pointer_query(hidden, self.rows, self.cols, self.phrase_starts, self.phrase_ends)

    def word_queries(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, D) input embeddings of the tokens -> (M, D) the mean embedding of each group's phrase
        (zeros without a phrase): the queries of a pointer that `reads` "words"."""
        return pointer_query(embeddings, self.rows, self.cols, self.phrase_starts, self.phrase_ends)[
            :, embeddings.shape[-1] :
        ]

    def select(self, keep: torch.Tensor) -> BoxQueries:
        return BoxQueries(*(t[keep] for t in vars(self).values()))


def pointer_query(
    hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """The pointer's query for each `<box>`: its hidden state beside the mean hidden state of its phrase
    (what the phrase names, as Groma and ChatRex read it), (M, 2D); zeros for a group without a phrase.

    hidden: (B, T, D); rows, cols: (M,) the `<box>` positions; starts, ends: (M,) phrase content ranges.
    """
    prefix = torch.cat([hidden.new_zeros((hidden.shape[0], 1, hidden.shape[2])), hidden.cumsum(1)], dim=1)
    length = (ends - starts).clamp(min=1).to(hidden.dtype)[:, None]
    phrase = (prefix[rows, ends] - prefix[rows, starts]) / length
    return torch.cat([hidden[rows, cols], phrase], dim=-1)


def image_of_rows(batch: int, image_sample_index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B,) the image index of every sample row (-1: no image)."""
    image_of_sample = torch.full((batch,), -1, dtype=torch.long, device=device)
    image_of_sample[image_sample_index.to(device)] = torch.arange(image_sample_index.numel(), device=device)
    return image_of_sample


def bins_to_canvas(
    bins: torch.Tensor, images: torch.Tensor, original_sizes: torch.Tensor, *, num_bins: int, canvas_size: int
) -> torch.Tensor:
    """(M, 4) loc bins of images `images` (M,) with (W, H) `original_sizes` (I, 2) -> (M, 4) xyxy canvas px."""
    if bins.shape[0] == 0:
        return torch.zeros((0, 4))
    fractions = (bins.float() + 0.5) / num_bins
    return torch.stack(
        [
            ImageMeta(tuple(original_sizes[i].tolist()), canvas_size).fractions_to_canvas(fractions[j])
            for j, i in enumerate(images.tolist())
        ]
    ).float()


def box_queries(groups: BatchBoxGroups, labels: torch.Tensor) -> BoxQueries:
    """The `<box>` groups (from the grammar's `box_groups_in_ids`) whose first `<loc_k>` is supervised
    (answers, not prompts). Groups in no phrase (inverted ones) get a phrase key of their own."""
    keep = labels[groups.rows, groups.starts + 1] >= 0
    index = torch.arange(len(groups.rows), device=groups.rows.device)
    phrase = torch.where(groups.spans >= 0, groups.spans, -2 - index)
    return BoxQueries(
        rows=groups.rows[keep],
        cols=groups.starts[keep],
        bins=groups.bins[keep],
        phrase=phrase[keep],
        phrase_starts=groups.phrase_starts[keep],
        phrase_ends=groups.phrase_ends[keep],
    )


def seg_prompts(
    groups: BatchBoxGroups,
    hidden: torch.Tensor,
    image_sample_index: torch.Tensor,
    original_sizes: torch.Tensor | None,
    *,
    num_bins: int,
    canvas_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every `<seg>` token: its image (M,), the box group before it (M, 4) canvas px, the hidden state (M, D).

    As in LISA, the prompt is the last hidden state at the position that predicts `<seg>` (t - 1),
    which generation also has when it emits `<seg>`. The box is the group whose `</box>` is right before
    the `<seg>` (the grammar's rule); groups come in the row-major order of the `<seg>` tokens.
    """
    device = hidden.device
    has_seg = groups.seg_positions >= 0
    rows, cols, bins = groups.rows[has_seg], groups.seg_positions[has_seg], groups.bins[has_seg]
    images = image_of_rows(hidden.shape[0], image_sample_index, device)[rows]
    bad = [tuple(p) for p in groups.stray_seg.tolist()]
    bad += [(int(r), int(c)) for r, c in zip(rows[images < 0], cols[images < 0], strict=True)]
    if bad:
        raise ValueError(
            f"<seg> token(s) at (sample, position) {bad} do not follow a <box> group of an image"
        )
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, hidden.new_zeros((0, 4)), hidden.new_zeros((0, hidden.shape[-1]))
    if original_sizes is None:
        raise ValueError("original_sizes is needed to place the <seg> box prompts on the canvas")
    boxes = bins_to_canvas(bins, images, original_sizes, num_bins=num_bins, canvas_size=canvas_size)
    return images, boxes.to(device), hidden[rows, cols - 1]


@dataclass
class PointerBatch:
    """The supervised `<box>` groups of a batch that have an image, with what a pointer needs of them.

    boxes: the M groups (their queries: `boxes.pointer_queries(hidden)` or `boxes.word_queries(embeddings)`);
    images: (M,) their image; proposals: the head's, of I images; region_map: (I, C, h, w)
    `pointer_features`; positives: (M, K + 1), excluded: (M, K) `pointer_targets`.
    """

    boxes: BoxQueries
    images: torch.Tensor
    proposals: Proposals
    region_map: torch.Tensor
    positives: torch.Tensor
    excluded: torch.Tensor


def answer_pointer_batch(
    model,
    groups: BatchBoxGroups,
    labels: torch.Tensor,
    image_sample_index: torch.Tensor,
    original_sizes: torch.Tensor,
    proposals: Proposals,
    region_map: torch.Tensor,
) -> PointerBatch | None:
    """The answers' `<box>` groups of a (B, T) batch with their targets among `proposals` of its images
    (`model`: the grounded model, for its loc tokens and canvas); None when no supervised `<box>` has an
    image."""
    queries = box_queries(groups, labels)
    images = image_of_rows(labels.shape[0], image_sample_index, labels.device)[queries.rows]
    keep = images >= 0
    if not bool(keep.any()):
        return None
    images = images[keep]
    target_boxes = bins_to_canvas(
        queries.bins[keep],
        images,
        original_sizes,
        num_bins=len(model.token_ids.loc),
        canvas_size=model.canvas_size,
    )
    positives, excluded = pointer_targets(proposals, images, target_boxes, queries.phrase[keep])
    return PointerBatch(queries.select(keep), images, proposals, region_map, positives, excluded)


def answer_pointer_loss(
    model,
    groups: BatchBoxGroups,
    labels: torch.Tensor,
    hidden: torch.Tensor,
    image_sample_index: torch.Tensor,
    original_sizes: torch.Tensor,
    out,
    pixel_values: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The pointer's training loss for `model` (`out` its output so far, with `detections` and `pyramid`;
    `hidden` (B, T, D) its last hidden states): cross-entropy of the answers' `<box>` queries over the
    head's proposals (+ "none"), and its accuracy (None, None when no supervised `<box>` has an image)."""
    proposals = out.proposals if out.proposals is not None else model.proposals(out.detections)
    region_map = model.pointer_features(out.pyramid, pixel_values)
    batch = answer_pointer_batch(
        model, groups, labels, image_sample_index, original_sizes, proposals, region_map
    )
    if batch is None:
        return None, None
    regions = model.pointer.region_embeddings(batch.region_map, batch.proposals)
    queries = batch.boxes.pointer_queries(hidden)
    logits = model.pointer(queries, batch.images, regions, batch.proposals.valid, batch.excluded)
    return pointer_loss(logits, batch.positives)
