"""`MaskHead` decodes all prompts of all images in one call: it must give what segment-anything's own
`MaskDecoder.forward` gives for each prompt alone (single-mask output), over the whole map or over each
prompt's crop, and a deterministic backward."""

import pytest
import torch
from torchvision.ops import roi_align

from grounded_llava import GroundedLlavaConfig
from grounded_llava.modeling.masks import (
    OUTSIDE_LOGIT,
    MaskHead,
    cell_centres,
    crop_frames,
    frame_to_canvas,
    sample_cells,
    targets_in_frames,
)


def _head_and_prompts(crop: int = 0):
    torch.manual_seed(0)
    head = MaskHead(
        channels=32, grid_size=14, canvas_size=112, text_hidden_size=48,
        depth=2, num_heads=4, mlp_dim=64, seg_mlp_hidden=64, crop=crop,
    )  # fmt: skip
    for parameter in head.parameters():  # SAM's zero-init tokens would hide a mix-up of prompts
        torch.nn.init.normal_(parameter, std=0.2)
    images = torch.randn(3, 32, 14, 14)
    image_index = torch.tensor([2, 0, 2, 1, 0, 2])  # unsorted, repeated, every image
    corners = torch.rand(6, 2) * 60
    boxes = torch.cat([corners, corners + 10 + torch.rand(6, 2) * 40], dim=1)
    seg_states = torch.randn(6, 48)
    return head, images, image_index, boxes, seg_states


def test_batched_decoding_equals_sam_per_prompt():
    head, images, image_index, boxes, seg_states = _head_and_prompts()
    box_only = torch.tensor([False, True, False, False, True, False])
    with torch.no_grad():
        masks, scores = head(images, image_index, boxes, seg_states, box_only=box_only)
        seg_tokens = head.seg_projection(seg_states)
        for row in range(6):
            token = head.box_only_embedding if box_only[row] else seg_tokens[row : row + 1]
            sparse, dense = head.prompt_encoder(points=None, boxes=boxes[row : row + 1], masks=None)
            expected_mask, expected_iou = head.mask_decoder(
                image_embeddings=images[image_index[row] : image_index[row] + 1],
                image_pe=head.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=torch.cat([sparse, token[:, None]], dim=1),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            assert masks[row].shape == (56, 56)  # 4x the 14x14 grid
            torch.testing.assert_close(masks[row], expected_mask[0, 0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(scores[row], expected_iou[0, 0], rtol=1e-4, atol=1e-5)
    # Every two prompts give masks further apart than the tolerance: a mix-up of rows would fail above.
    gaps = (masks[:, None] - masks[None]).abs().flatten(2).amax(2) + torch.eye(6)
    assert gaps.min() > 1e-3, gaps


def test_crop_decoding_equals_sam_on_each_prompts_crop():
    """With `crop`, each prompt's decoder input is its widened box sampled from its image's map, with SAM's
    positional encoding at those cells' canvas positions: SAM's own decoder given that crop must agree."""
    head, images, image_index, boxes, seg_states = _head_and_prompts(crop=6)
    with torch.no_grad():
        prediction = head.predict(images, image_index, boxes, seg_states)
        frames = crop_frames(boxes)
        torch.testing.assert_close(prediction.frames, frames)
        assert prediction.logits.shape == (6, 24, 24)  # 4x the 6x6 crop grid
        seg_tokens = head.seg_projection(seg_states)
        for row in range(6):
            image = images[image_index[row] : image_index[row] + 1]
            crop = sample_cells(image, torch.tensor([0]), frames[row : row + 1], 6, canvas_size=112)
            positions = head.prompt_encoder.pe_layer.forward_with_coords(
                cell_centres(frames[row : row + 1], 6), (112, 112)
            )
            sparse, _ = head.prompt_encoder(points=None, boxes=boxes[row : row + 1], masks=None)
            expected_mask, expected_iou = head.mask_decoder(
                image_embeddings=crop,
                image_pe=positions.transpose(1, 2).reshape(1, 32, 6, 6),
                sparse_prompt_embeddings=torch.cat([sparse, seg_tokens[row : row + 1, None]], dim=1),
                dense_prompt_embeddings=head.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                    1, -1, 6, 6
                ),
                multimask_output=False,
            )
            torch.testing.assert_close(prediction.logits[row], expected_mask[0, 0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(prediction.iou[row], expected_iou[0, 0], rtol=1e-4, atol=1e-5)
        canvas = head.on_canvas(prediction)
    assert canvas.shape == (6, 112, 112) and head.mask_resolution == 112  # canvas-frame, at canvas pixels
    x0, y0, x1, y1 = frames[0].tolist()
    assert (canvas[0, : max(int(y0) - 1, 0)] == OUTSIDE_LOGIT).all()  # rows above the first frame
    assert (canvas[0, :, int(x1) + 2 :] == OUTSIDE_LOGIT).all()  # columns right of it


def test_cells_are_sampled_where_roi_align_puts_its_bin_centres():
    """Inside the map `sample_cells` equals torchvision's roi_align with one sample per bin (the cell
    centres), whatever the image and frame; a frame beyond the canvas reads zeros there."""
    torch.manual_seed(0)
    images = torch.randn(3, 8, 14, 14)  # a stride-8 map over a 112 px canvas
    image_index = torch.tensor([2, 0, 1, 2])
    frames = torch.tensor(
        [
            [10.0, 20.0, 50.0, 44.0],
            [5.0, 5.0, 107.0, 107.0],
            [60.0, 30.0, 80.0, 90.0],
            [33.3, 41.7, 47.1, 101.9],
        ]
    )
    rois = torch.cat([image_index[:, None].float(), frames], dim=1)
    expected = roi_align(images, rois, 5, spatial_scale=14 / 112, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(sample_cells(images, image_index, frames, 5, canvas_size=112), expected)
    beyond = sample_cells(
        images, torch.tensor([0]), torch.tensor([[-200.0, 0.0, -120.0, 80.0]]), 5, canvas_size=112
    )
    assert (beyond == 0).all()


def test_a_mask_survives_the_trip_into_its_frame_and_back_to_the_canvas():
    target = torch.zeros(1, 224, 224)
    target[0, 60:100, 40:70] = 1  # a 30 x 40 px box-shaped object
    frames = crop_frames(torch.tensor([[40.0, 60.0, 70.0, 100.0]]))
    assert frames.tolist() == [[32.5, 50.0, 77.5, 110.0]]  # widened by 25% of each side on every side
    in_frame = targets_in_frames(target, frames, canvas_size=224, side=56)
    assert in_frame.shape == (1, 56, 56) and set(in_frame.unique().tolist()) == {0.0, 1.0}
    back = frame_to_canvas(in_frame * 40 - 20, frames, canvas_size=224, resolution=224) > 0
    iou = (back & (target > 0)).sum() / (back | (target > 0)).sum()
    assert iou > 0.97, iou


def test_only_checkpoints_saved_before_crops_decode_the_whole_map():
    saved = GroundedLlavaConfig().to_dict()
    del saved["heads"]["mask_crop"]
    assert GroundedLlavaConfig.from_saved(saved).heads.mask_crop == 0
    assert GroundedLlavaConfig.from_dict({}).heads.mask_crop == 14
    assert GroundedLlavaConfig.from_saved(GroundedLlavaConfig().to_dict()).heads.mask_crop == 14


@pytest.mark.parametrize("crop", [0, 8])
def test_backward_to_the_image_embeddings_is_deterministic(crop):
    """Several prompts of one image add their gradients into it; the sum must not depend on thread timing
    (an exact resume compares weights bit for bit: tests/test_resume_boundaries.py)."""
    _, images, image_index, boxes, seg_states = _head_and_prompts()
    images = images.repeat(1, 1, 2, 2).requires_grad_(True)  # 28x28: large enough for parallel kernels
    head = MaskHead(
        channels=32, grid_size=28, canvas_size=112, text_hidden_size=48,
        depth=2, num_heads=4, mlp_dim=64, seg_mlp_hidden=64, crop=crop,
    )  # fmt: skip
    gradients = []
    for _ in range(15):
        images.grad = None
        masks, scores = head(images, image_index.repeat(8), boxes.repeat(8, 1), seg_states.repeat(8, 1))
        (masks.square().mean() + scores.mean()).backward()
        gradients.append(images.grad.clone())
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])


def test_pixel_detail_starts_as_sam_and_needs_the_pixels():
    """A fresh head with pixel detail decodes exactly as without it (its last conv starts at zero); it refuses
    to decode without the canvas pixels rather than decoding without them."""
    head, images, image_index, boxes, seg_states = _head_and_prompts(crop=6)
    torch.manual_seed(1)
    detailed = MaskHead(
        channels=32, grid_size=14, canvas_size=112, text_hidden_size=48,
        depth=2, num_heads=4, mlp_dim=64, seg_mlp_hidden=64, crop=6, pixels=True,
    )  # fmt: skip
    detailed.load_state_dict(head.state_dict(), strict=False)
    pixels = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = head.predict(images, image_index, boxes, seg_states)
        found = detailed.predict(images, image_index, boxes, seg_states, pixels=pixels)
        torch.testing.assert_close(found.logits, expected.logits)
        with pytest.raises(ValueError, match="pass the canvas pixels"):
            detailed.predict(images, image_index, boxes, seg_states)
