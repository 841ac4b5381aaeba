"""GroundedProcessor: canvas mapping on non-square images, template, label masking, image tokens, padding."""

import numpy as np
import pytest
import torch

from grounded_llava.codec import encode_phrase
from grounded_llava.image_meta import ImageMeta
from grounded_llava.processor import IGNORE_INDEX, GroundedProcessor


@pytest.fixture(scope="module")
def processor(tiny_config):
    from grounded_llava.modeling.base import build_tiny_base, image_settings_for

    llava, tokenizer = build_tiny_base(tiny_config.tiny, tiny_config.num_bins)
    settings = image_settings_for(llava.config)
    return GroundedProcessor(
        tokenizer,
        image_size=settings.image_size,
        num_image_tokens=settings.num_image_tokens,
        num_bins=tiny_config.num_bins,
        system_prompt=tiny_config.system_prompt,
    )


@pytest.mark.parametrize("size", [(200, 100), (90, 300), (64, 64)])
def test_image_meta_round_trip_on_non_square_images(size):
    meta = ImageMeta(original_size=size, canvas_size=112)
    boxes = np.array([[0, 0, size[0], size[1]], [3.5, 7.25, 40.0, 50.5]])
    canvas = meta.boxes_to_canvas(boxes)
    assert canvas.min() >= 0 and canvas.max() <= 112
    np.testing.assert_allclose(meta.boxes_from_canvas(canvas), boxes, atol=1e-9)
    # The image is centred: the full-image box spans the canvas along the long side only.
    long_axis = 0 if size[0] >= size[1] else 1
    assert canvas[0, long_axis] == 0 and canvas[0, long_axis + 2] == 112
    mask = np.zeros(size[::-1], dtype=bool)
    mask[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = True
    back = meta.mask_from_canvas(meta.mask_to_canvas(mask, 448) * 2 - 1)
    assert back.shape == mask.shape and (back & mask).sum() / (back | mask).sum() > 0.9


def test_a_mask_is_clipped_to_the_box_that_prompted_it():
    meta = ImageMeta(original_size=(200, 100), canvas_size=112)
    logits = torch.ones(56, 56)  # the whole canvas says "object"
    everywhere = meta.mask_from_canvas(logits)
    clipped = meta.mask_from_canvas(logits, box=(20.0, 10.0, 60.5, 40.0))
    assert everywhere.all() and clipped.sum() == 41 * 30  # pixel centres 20.5..60.5 x 10.5..39.5
    assert clipped[10:40, 20:61].all() and not clipped[:, 61:].any() and not clipped[40:].any()


def test_pixels_pad_with_mean_colour(processor):
    from PIL import Image

    pixels, meta = processor.preprocess_image(Image.new("RGB", (200, 100), (255, 255, 255)))
    assert pixels.shape == (3, 112, 112) and meta.original_size == (200, 100)
    # Top rows are padding: the mean colour normalises to ~0.
    assert pixels[:, :20].abs().max() < 0.02
    assert pixels[:, 40:70].min() > 1.5  # white


def test_template_labels_and_image_tokens(processor, random_image):
    answer = "Here " + encode_phrase("circle", [(10, 10, 50, 40)], (200, 100), num_bins=32, seg=True)
    conversation = [
        {"from": "human", "value": "<image>\nWhere is the circle?"},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": "And its colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    encoded = processor.encode_conversation(conversation, random_image(200, 100))
    ids, labels = encoded.input_ids, encoded.labels
    assert (ids == processor.image_token_id).sum() == processor.num_image_tokens == 49
    supervised = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert supervised.replace(" ", "") == (answer + "</s>" + "Red." + "</s>").replace(" ", "")
    text = processor.tokenizer.decode(ids[ids != processor.image_token_id])
    assert "USER:" in text and text.count("ASSISTANT:") == 2 and text.startswith("<s>A chat")
    assert processor.parse(processor.decode(ids[labels != IGNORE_INDEX]), encoded.image_meta).spans[
        0
    ].seg == [True]


def test_batched_padding_left_and_right(processor, random_image):
    convs = [
        [{"from": "human", "value": "<image>\nHi"}],
        [{"from": "human", "value": "<image>\nA much longer prompt here"}],
    ]
    images = [random_image(50, 80), random_image(120, 60)]
    right = processor(convs, images, add_generation_prompt=True)
    left = processor(convs, images, add_generation_prompt=True, padding_side="left")
    assert right.input_ids.shape == left.input_ids.shape and right.pixel_values.shape == (2, 3, 112, 112)
    assert right.attention_mask[0, -1] == 0 and left.attention_mask[0, 0] == 0
    assert torch.equal(right.original_sizes, torch.tensor([[50, 80], [120, 60]]))
    for row in range(2):
        assert torch.equal(
            right.input_ids[row][right.attention_mask[row].bool()],
            left.input_ids[row][left.attention_mask[row].bool()],
        )


def test_bad_input_raises_clear_errors(processor, random_image):
    with pytest.raises(ValueError, match="image-token count mismatch"):
        processor.encode_conversation(
            [{"from": "human", "value": "No marker"}], random_image(20, 20), add_generation_prompt=True
        )
    with pytest.raises(ValueError, match="image-token count mismatch"):
        processor.encode_conversation(
            [{"from": "human", "value": "<image>\n<image>"}], random_image(20, 20), add_generation_prompt=True
        )
    with pytest.raises(ValueError, match="empty prompt"):
        processor.encode_conversation([{"from": "human", "value": "  "}], None, add_generation_prompt=True)
    with pytest.raises(ValueError, match="expected a 'gpt' turn"):
        processor.encode_conversation(
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], None
        )
    from PIL import Image

    with pytest.raises(ValueError, match="empty image"):
        processor.preprocess_image(Image.new("RGB", (0, 10)))


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = GroundedProcessor.from_pretrained(tmp_path)
    text = "USER: " + encode_phrase("dog", [(1, 2, 30, 40)], (64, 64), num_bins=32) + " <seg>"
    assert loaded.tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    assert loaded.token_ids == processor.token_ids and loaded.num_image_tokens == processor.num_image_tokens
