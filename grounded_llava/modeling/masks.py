"""`MaskHead`: segment-anything's `PromptEncoder` + `MaskDecoder`, prompted by a box and the `<seg>` state.

Frames: prompts are boxes in canvas pixels (S, S); masks come out as logits on the whole canvas at
4x the patch-grid resolution ((4g, 4g), the decoder's low-res output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn


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
    ) -> None:
        super().__init__()
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

    @property
    def mask_resolution(self) -> int:
        return 4 * self.prompt_encoder.image_embedding_size[0]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        boxes_canvas: torch.Tensor,
        seg_hidden: torch.Tensor | None,
        box_only: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict one mask per prompt.

        Args:
            image_embeddings: (I, C, g, g) the neck's stride-`patch` level.
            image_index: (M,) which image each prompt belongs to.
            boxes_canvas: (M, 4) xyxy canvas pixels.
            seg_hidden: (M, D_text) LLM last hidden states of the `<seg>` prompts; None: box prompts only.
            box_only: (M,) bool, prompts whose text state is replaced by the box-only embedding
                (training drops some so that the decoder also serves box-only requests).
        Returns:
            mask_logits (M, 4g, 4g) over the canvas, and SAM's predicted mask IoU (M,).
        """
        count = image_index.numel()
        resolution = self.mask_resolution
        if count == 0:
            empty = image_embeddings.new_zeros((0, resolution, resolution))
            return empty, image_embeddings.new_zeros((0,))
        box_only_tokens = self.box_only_embedding.expand(count, -1)
        if seg_hidden is None:
            seg_tokens = box_only_tokens
        else:
            seg_tokens = self.seg_projection(seg_hidden.to(image_embeddings.dtype))
            if box_only is not None:
                seg_tokens = torch.where(box_only[:, None], box_only_tokens, seg_tokens)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes_canvas, masks=None)
        sparse = torch.cat([sparse, seg_tokens.unsqueeze(1)], dim=1)
        # index_select: its backward (index_add_) sums a prompt's gradient into its image in a fixed order on
        # CPU; advanced indexing's (index_put_ with accumulate) adds atomically in parallel, so runs differ.
        prompt_images = image_embeddings.index_select(0, image_index.to(image_embeddings.device))
        return self._decode(prompt_images + dense, sparse)

    def _decode(self, prompt_images: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's `MaskDecoder.predict_masks` (single-mask output) for all prompts of all images in one call.

        SAM repeats one image's embedding for each of its prompts; here every prompt brings its own image
        (`prompt_images` (M, C, g, g), the dense prompt already added), so a batch of images decodes at once.
        sparse: (M, P, C) prompt tokens. Returns (M, 4g, 4g) logits of the first mask token and its IoU (M,).
        """
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        positions = self.prompt_encoder.get_dense_pe().expand(prompt_images.shape[0], -1, -1, -1)
        count, channels, height, width = prompt_images.shape
        states, image_states = decoder.transformer(prompt_images, positions, tokens)
        upscaled = decoder.output_upscaling(
            image_states.transpose(1, 2).reshape(count, channels, height, width)
        )
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
