"""`MaskHead`: segment-anything's `PromptEncoder` + `MaskDecoder`, prompted by a box and the `<seg>` state.

Frames: prompts are boxes in canvas pixels (S, S). The decoder reads either the whole stride-8 map (g x g
tokens; masks at 4g x 4g over the canvas, the first models) or, with `crop` = k, a k x k grid sampled
from the map over each prompt's box widened by `CROP_MARGIN` (masks at 4k x 4k over that frame, as Mask
R-CNN's RoI masks; docs/EXPERIMENTS.md E34). `forward` always returns canvas-frame logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn
from torchvision.ops import roi_align

CROP_MARGIN = 0.25
"""A crop frame is its box widened by this fraction of the box's side on every side (context, and room
for a prompt box that cuts the object)."""
CROP_MIN_SIDE = 16.0
"""Canvas pixels: the smallest crop frame side (two stride-8 cells)."""
OUTSIDE_LOGIT = -20.0
"""Canvas-frame logit of the pixels outside a mask's crop frame (a confident background)."""


@dataclass
class MaskPrediction:
    """The decoder's masks in their own frames.

    logits: (M, m, m) over `frames`; frames: (M, 4) xyxy canvas pixels (the whole canvas without crops);
    iou: (M,) SAM's predicted mask IoU.
    """

    logits: torch.Tensor
    frames: torch.Tensor
    iou: torch.Tensor


def crop_frames(boxes_canvas: torch.Tensor) -> torch.Tensor:
    """(M, 4) xyxy prompt boxes -> (M, 4) xyxy crop frames: widened by `CROP_MARGIN`, at least `CROP_MIN_SIDE`."""
    centre = (boxes_canvas[:, :2] + boxes_canvas[:, 2:]) / 2
    side = (boxes_canvas[:, 2:] - boxes_canvas[:, :2]).clamp(min=0) * (1 + 2 * CROP_MARGIN)
    half = side.clamp(min=CROP_MIN_SIDE) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def cell_centres(frames: torch.Tensor, cells: int) -> torch.Tensor:
    """(M, 4) xyxy frames -> (M, cells * cells, 2) xy canvas pixels of a cells x cells grid's centres, row-major."""
    steps = (torch.arange(cells, device=frames.device, dtype=frames.dtype) + 0.5) / cells
    xs = frames[:, 0:1] + steps[None] * (frames[:, 2:3] - frames[:, 0:1])  # (M, cells)
    ys = frames[:, 1:2] + steps[None] * (frames[:, 3:4] - frames[:, 1:2])
    grid_y, grid_x = ys[:, :, None].expand(-1, -1, cells), xs[:, None, :].expand(-1, cells, -1)
    return torch.stack([grid_x, grid_y], dim=-1).flatten(1, 2)


def sample_cells(
    feature_map: torch.Tensor,
    image_index: torch.Tensor,
    frames: torch.Tensor,
    cells: int,
    *,
    canvas_size: int,
) -> torch.Tensor:
    """(I, C, h, w) map over the (S, S) canvas -> (M, C, cells, cells): the map at each frame's `cell_centres`.

    Frames (M, 4) are xyxy canvas pixels of the images `image_index` (M,). The map covers the canvas exactly
    (cell (i, j) at canvas ((j + 0.5) S / w, (i + 0.5) S / h)); bilinear, zeros outside the canvas. Inside
    the map this equals torchvision's `roi_align(sampling_ratio=1, aligned=True)`, whose CPU backward is
    ~3x slower (docs/EXPERIMENTS.md E35).
    """
    grid = cell_centres(frames, cells) / canvas_size * 2 - 1  # (M, cells*cells, 2), [-1, 1] over the canvas
    # index_select: a deterministic backward (index_add_ in a fixed order), unlike advanced indexing on CPU
    sampled = F.grid_sample(
        feature_map.index_select(0, image_index), grid[:, None], mode="bilinear", align_corners=False
    )  # (M, C, 1, cells*cells)
    return sampled.view(len(frames), -1, cells, cells)


def frame_to_canvas(
    logits: torch.Tensor, frames: torch.Tensor, *, canvas_size: int, resolution: int
) -> torch.Tensor:
    """(M, m, m) logits over `frames` (M, 4) -> (M, r, r) canvas-frame logits (r = `resolution`), bilinear
    inside each frame and `OUTSIDE_LOGIT` beyond it."""
    centres = cell_centres(frames.new_tensor([[0.0, 0.0, canvas_size, canvas_size]]), resolution)[
        0
    ]  # (r*r, 2)
    size = (frames[:, 2:] - frames[:, :2]).clamp(min=1e-6)
    grid = (centres[None] - frames[:, None, :2]) / size[:, None] * 2 - 1  # (M, r*r, 2) in [-1, 1] inside
    sampled = F.grid_sample(
        logits[:, None], grid[:, None], mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0, 0]
    inside = (grid.abs() <= 1).all(dim=-1)
    return torch.where(inside, sampled, sampled.new_tensor(OUTSIDE_LOGIT)).view(-1, resolution, resolution)


def targets_in_frames(
    targets: torch.Tensor, frames: torch.Tensor, *, canvas_size: int, side: int
) -> torch.Tensor:
    """(M, r, r) {0, 1} canvas-frame masks -> (M, side, side) {0, 1} masks over `frames` (area-sampled, >= 0.5)."""
    if targets.shape[0] == 0:
        return targets.new_zeros((0, side, side))
    rois = torch.cat(
        [torch.arange(len(frames), device=frames.device, dtype=frames.dtype)[:, None], frames], 1
    )
    scale = targets.shape[-1] / canvas_size
    sampled = roi_align(
        targets[:, None].float(), rois.float(), side, spatial_scale=scale, sampling_ratio=2, aligned=True
    )
    return (sampled[:, 0] >= 0.5).to(targets.dtype)


class MaskHead(nn.Module):
    """SAM's mask decoder over the neck's stride-`patch` map (I, C, g, g).

    Every `<seg>` token gives two prompts (as LISA with a box): the box before it (SAM box prompt)
    and its LLM hidden state through `seg_projection` (one extra sparse prompt token).
    """

    def __init__(
        self,
        *,
        channels: int,
        grid_size: int,
        canvas_size: int,
        text_hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        seg_mlp_hidden: int,
        crop: int = 0,
        pixels: bool = False,
    ) -> None:
        super().__init__()
        if pixels and not crop:
            raise ValueError("MaskHead: pixel detail needs crops (crop > 0)")
        self.crop = crop
        self.canvas_size = canvas_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=channels,
            image_embedding_size=(grid_size, grid_size),
            input_image_size=(canvas_size, canvas_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=channels,
            transformer=TwoWayTransformer(
                depth=depth, embedding_dim=channels, mlp_dim=mlp_dim, num_heads=num_heads
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=channels,
        )
        self.seg_projection = nn.Sequential(
            nn.Linear(text_hidden_size, seg_mlp_hidden),
            nn.ReLU(),
            nn.Linear(seg_mlp_hidden, channels),
        )
        # Stands in for the <seg> prompt when a mask is asked for by box alone (head detections).
        self.box_only_embedding = nn.Parameter(torch.zeros(1, channels))
        # The crop's canvas pixels at the mask's resolution, added to SAM's upscaled features before the mask
        # token's product (as SAM-HQ adds early features): the stride-8 map alone cannot place an edge to the
        # pixel. The last conv starts at zero, so a fresh head decodes as SAM does.
        self.pixel_detail = None
        if pixels:
            self.pixel_detail = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, channels // 8, 3, padding=1)
            )
            nn.init.zeros_(self.pixel_detail[-1].weight)
            nn.init.zeros_(self.pixel_detail[-1].bias)

    @property
    def mask_resolution(self) -> int:
        """Side of the canvas-frame masks `forward` returns (and of the targets the losses read)."""
        return self.canvas_size if self.crop else 4 * self.prompt_encoder.image_embedding_size[0]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        boxes_canvas: torch.Tensor,
        seg_hidden: torch.Tensor | None,
        box_only: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict one mask per prompt.

        Args:
            image_embeddings: (I, C, g, g) the neck's stride-`patch` level.
            image_index: (M,) which image each prompt belongs to.
            boxes_canvas: (M, 4) xyxy canvas pixels.
            seg_hidden: (M, D_text) LLM last hidden states of the `<seg>` prompts; None: box prompts only.
            box_only: (M,) bool, prompts whose text state is replaced by the box-only embedding
                (training drops some so that the decoder also serves box-only requests).
            pixels: (I, 3, S, S) the canvas pixels, needed by a head with pixel detail.
        Returns:
            mask_logits (M, r, r) over the canvas (r = `mask_resolution`), and SAM's predicted mask IoU (M,).
        """
        prediction = self.predict(image_embeddings, image_index, boxes_canvas, seg_hidden, box_only, pixels)
        return self.on_canvas(prediction), prediction.iou

    def on_canvas(self, prediction: MaskPrediction) -> torch.Tensor:
        """(M, r, r) canvas-frame logits of `prediction` (its own logits when it decoded the whole canvas)."""
        if not self.crop:
            return prediction.logits
        return frame_to_canvas(
            prediction.logits,
            prediction.frames,
            canvas_size=self.canvas_size,
            resolution=self.mask_resolution,
        )

    def loss(
        self, prediction: MaskPrediction, targets: torch.Tensor, *, bce_weight: float, dice_weight: float
    ) -> torch.Tensor:
        """`mask_loss` in the prediction's frames; targets (M, r, r) {0, 1} canvas-frame (r = `mask_resolution`)."""
        if self.crop:
            targets = targets_in_frames(
                targets.to(prediction.logits.dtype), prediction.frames,
                canvas_size=self.canvas_size, side=prediction.logits.shape[-1],
            )  # fmt: skip
        return mask_loss(prediction.logits, targets, bce_weight=bce_weight, dice_weight=dice_weight)

    def predict(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        boxes_canvas: torch.Tensor,
        seg_hidden: torch.Tensor | None,
        box_only: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> MaskPrediction:
        """One mask per prompt in its own frame (arguments as `forward`)."""
        if self.pixel_detail is not None and pixels is None:
            raise ValueError("this mask head adds pixel detail: pass the canvas pixels")
        count = image_index.numel()
        side = 4 * (self.crop or self.prompt_encoder.image_embedding_size[0])
        if count == 0:
            empty = image_embeddings.new_zeros((0, side, side))
            return MaskPrediction(empty, image_embeddings.new_zeros((0, 4)), image_embeddings.new_zeros((0,)))
        box_only_tokens = self.box_only_embedding.expand(count, -1)
        if seg_hidden is None:
            seg_tokens = box_only_tokens
        else:
            seg_tokens = self.seg_projection(seg_hidden.to(image_embeddings.dtype))
            if box_only is not None:
                seg_tokens = torch.where(box_only[:, None], box_only_tokens, seg_tokens)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes_canvas, masks=None)
        sparse = torch.cat([sparse, seg_tokens.unsqueeze(1)], dim=1)
        image_index = image_index.to(image_embeddings.device)
        if self.crop:
            frames = crop_frames(boxes_canvas.detach().to(image_embeddings.dtype))
            prompt_images = sample_cells(
                image_embeddings, image_index, frames, self.crop, canvas_size=self.canvas_size
            )
            centres = cell_centres(frames, self.crop)  # (M, k*k, 2)
            positions = self.prompt_encoder.pe_layer.forward_with_coords(centres, (self.canvas_size,) * 2)
            positions = positions.to(prompt_images.dtype).transpose(1, 2).reshape(prompt_images.shape)
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # SAM's dense prompt
            detail = None
            if self.pixel_detail is not None:
                rois = torch.cat([image_index[:, None].to(frames.dtype), frames], dim=1)
                crops = roi_align(  # no gradient: torchvision's area average, 2 x 2 samples per mask pixel
                    pixels.to(frames.dtype),
                    rois,
                    4 * self.crop,
                    spatial_scale=1.0,
                    sampling_ratio=2,
                    aligned=True,
                )
                detail = self.pixel_detail(crops)
            logits, iou = self._decode(prompt_images + no_mask, sparse, positions, detail)
            return MaskPrediction(logits, frames, iou)
        # index_select: its backward (index_add_) sums a prompt's gradient into its image in a fixed order on
        # CPU; advanced indexing's (index_put_ with accumulate) adds atomically in parallel, so runs differ.
        prompt_images = image_embeddings.index_select(0, image_index)
        positions = self.prompt_encoder.get_dense_pe().expand(count, -1, -1, -1)
        logits, iou = self._decode(prompt_images + dense, sparse, positions)
        whole = boxes_canvas.new_tensor([[0.0, 0.0, self.canvas_size, self.canvas_size]]).expand(count, -1)
        return MaskPrediction(logits, whole, iou)

    def _decode(
        self,
        prompt_images: torch.Tensor,
        sparse: torch.Tensor,
        positions: torch.Tensor,
        detail: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's `MaskDecoder.predict_masks` (single-mask output) for all prompts of all images in one call.

        SAM repeats one image's embedding for each of its prompts; here every prompt brings its own image
        (`prompt_images` (M, C, h, w): the map or its crop, the dense prompt already added) and its positional
        encoding (`positions`, same shape), so a batch of images decodes at once.
        sparse: (M, P, C) prompt tokens; detail: (M, C / 8, 4h, 4w) added to the upscaled features, or None.
        Returns (M, 4h, 4w) logits of the first mask token and its IoU (M,).
        """
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        count, channels, height, width = prompt_images.shape
        states, image_states = decoder.transformer(prompt_images, positions, tokens)
        upscaled = decoder.output_upscaling(
            image_states.transpose(1, 2).reshape(count, channels, height, width)
        )
        if detail is not None:
            upscaled = upscaled + detail
        hyper = decoder.output_hypernetworks_mlps[0](states[:, 1, :])  # (M, C / 8): the first mask token
        masks = (hyper[:, None, :] @ upscaled.flatten(2)).view(count, *upscaled.shape[-2:])
        return masks, decoder.iou_prediction_head(states[:, 0, :])[:, 0]


def mask_loss(
    mask_logits: torch.Tensor, targets: torch.Tensor, *, bce_weight: float, dice_weight: float
) -> torch.Tensor:
    """LISA's mask loss: per-mask mean BCE + dice, averaged over masks. Both (M, h, w); targets in {0, 1}."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    logits, targets = mask_logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probs = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
    return (bce_weight * bce + dice_weight * dice).mean()
