"""Where the heads read the LLM: `<seg>` mask prompts and `<box>` pointer queries, from (B, T) token ids.

A box group is `<box> l0 l1 l2 l3 </box>` (four `<loc_k>` tokens, bins of the ORIGINAL image's
fractions); `bins_to_canvas` places it on the model canvas (xyxy canvas pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..image_meta import ImageMeta
from ..tokenizer import GroundingTokenIds


@dataclass
class BoxQueries:
    """The supervised `<box>` groups of a batch, in reading order (row-major).

    rows, cols: (M,) sample row and position of each `<box>` token; bins: (M, 4) its loc bins;
    phrase: (M,) a key equal for the groups of one phrase (one row, same count of `</p>` before).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    bins: torch.Tensor
    phrase: torch.Tensor


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


def box_queries(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    token_ids: GroundingTokenIds,
    loc_bin_of_token: torch.Tensor,
) -> BoxQueries:
    """The complete `<box>` groups whose first `<loc_k>` is supervised (answers, not prompts)."""
    batch, length = input_ids.shape
    rows, cols = (input_ids == token_ids.box_open).nonzero(as_tuple=True)
    keep = cols + 5 < length
    rows, cols = rows[keep], cols[keep]
    window = torch.stack([input_ids[rows, cols + k] for k in range(1, 6)], dim=1)
    bins = loc_bin_of_token[window[:, :4]]
    keep = (bins >= 0).all(1) & (window[:, 4] == token_ids.box_close) & (labels[rows, cols + 1] >= 0)
    closes = (input_ids == token_ids.p_close).long().cumsum(1)
    rows, cols, bins = rows[keep], cols[keep], bins[keep]
    return BoxQueries(rows=rows, cols=cols, bins=bins, phrase=rows * (length + 1) + closes[rows, cols])


def seg_prompts(
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    image_sample_index: torch.Tensor,
    original_sizes: torch.Tensor | None,
    *,
    token_ids: GroundingTokenIds,
    loc_bin_of_token: torch.Tensor,
    canvas_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every `<seg>` token: its image (M,), the box group before it (M, 4) canvas px, the hidden state (M, D).

    As in LISA, the prompt is the last hidden state at the position that predicts `<seg>` (t - 1),
    which generation also has when it emits `<seg>`. The box is read from the four `<loc_k>`
    tokens of the `<box>` group that the `<seg>` follows: `<box> l0 l1 l2 l3 </box> <seg>`.
    """
    rows, cols = (input_ids == token_ids.seg).nonzero(as_tuple=True)
    device = hidden.device
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, hidden.new_zeros((0, 4)), hidden.new_zeros((0, hidden.shape[-1]))
    images = image_of_rows(input_ids.shape[0], image_sample_index, device)[rows]
    window = torch.stack([input_ids[rows, (cols - k).clamp(min=0)] for k in range(6, 0, -1)], dim=1)
    bins = loc_bin_of_token[window[:, 1:5]]
    valid = (cols >= 6) & (images >= 0) & (bins >= 0).all(1)
    valid &= (window[:, 0] == token_ids.box_open) & (window[:, 5] == token_ids.box_close)
    if not bool(valid.all()):
        bad = [(int(r), int(c)) for r, c in zip(rows[~valid], cols[~valid], strict=True)]
        raise ValueError(
            f"<seg> token(s) at (sample, position) {bad} do not follow a <box> group of an image"
        )
    if original_sizes is None:
        raise ValueError("original_sizes is needed to place the <seg> box prompts on the canvas")
    boxes = bins_to_canvas(bins, images, original_sizes, num_bins=len(token_ids.loc), canvas_size=canvas_size)
    return images, boxes.to(device), hidden[rows, cols - 1]
