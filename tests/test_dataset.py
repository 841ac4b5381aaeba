"""GroundedDataset: head targets on the canvas, and a horizontal flip that keeps image, boxes, masks and text consistent."""

import numpy as np

from grounded_llava.codec import encode_phrase, parse_grounded
from grounded_llava.data.dataset import flip_sample, flip_text
from grounded_llava.data.sample import GroundedSample


def test_flip_keeps_image_boxes_masks_and_text_consistent(random_image):
    image = random_image(120, 80)
    box = (10.0, 20.0, 50.0, 60.0)
    mask = np.zeros((80, 120), dtype=bool)
    mask[20:60, 10:50] = True
    answer = "The circle on the left: " + encode_phrase("circle", [box], (120, 80), num_bins=40, seg=True)
    sample = GroundedSample(
        None, [{"from": "human", "value": "<image>\nWhere is the leftmost circle?"}, {"from": "gpt", "value": answer}],
        (120, 80), True, np.array([box], np.float32), ["circle"], [mask],
    )  # fmt: skip
    flipped, flipped_image = flip_sample(sample, image, num_bins=40)
    assert np.array_equal(np.asarray(flipped_image), np.asarray(image)[:, ::-1])
    assert np.allclose(flipped.det_boxes, [[70.0, 20.0, 110.0, 60.0]])
    assert np.array_equal(flipped.seg_masks[0], mask[:, ::-1])
    assert (
        "rightmost" in flipped.conversation[0]["value"] and "on the right" in flipped.conversation[1]["value"]
    )
    parsed = parse_grounded(flipped.conversation[1]["value"], (120, 80), num_bins=40)
    assert parsed.spans[0].seg == [True]
    assert np.allclose(parsed.spans[0].boxes[0], flipped.det_boxes[0], atol=120 / 40)


def test_flip_text_twice_is_identity():
    text = "left <box><loc_1><loc_2><loc_30><loc_9></box> Right"
    assert flip_text(flip_text(text, 32), 32) == text
