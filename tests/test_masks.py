"""`MaskHead` decodes all prompts of all images in one call: it must give what segment-anything's own
`MaskDecoder.forward` gives for each prompt alone (single-mask output), and a deterministic backward."""

import torch

from grounded_llava.modeling.masks import MaskHead


def _head_and_prompts():
    torch.manual_seed(0)
    head = MaskHead(
        channels=32, grid_size=14, canvas_size=112, text_hidden_size=48,
        depth=2, num_heads=4, mlp_dim=64, seg_mlp_hidden=64,
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


def test_backward_to_the_image_embeddings_is_deterministic():
    """Several prompts of one image add their gradients into it; the sum must not depend on thread timing
    (an exact resume compares weights bit for bit: tests/test_resume_boundaries.py)."""
    _, images, image_index, boxes, seg_states = _head_and_prompts()
    images = images.repeat(1, 1, 2, 2).requires_grad_(True)  # 28x28: large enough for parallel kernels
    head = MaskHead(
        channels=32, grid_size=28, canvas_size=112, text_hidden_size=48,
        depth=2, num_heads=4, mlp_dim=64, seg_mlp_hidden=64,
    )  # fmt: skip
    gradients = []
    for _ in range(15):
        images.grad = None
        masks, scores = head(images, image_index.repeat(8), boxes.repeat(8, 1), seg_states.repeat(8, 1))
        (masks.square().mean() + scores.mean()).backward()
        gradients.append(images.grad.clone())
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])
