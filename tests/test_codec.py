"""Grounding-token codec: round trips within one bin, lenient parsing of arbitrary token sequences."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounded_llava import encode_grounded, parse_grounded
from grounded_llava.codec import encode_box, grounding_tokens


@st.composite
def image_and_boxes(draw):
    width = draw(st.integers(1, 2000))
    height = draw(st.integers(1, 2000))
    num_bins = draw(st.integers(2, 1000))
    boxes = []
    for _ in range(draw(st.integers(1, 4))):
        x0 = draw(st.floats(0, width, allow_nan=False))
        y0 = draw(st.floats(0, height, allow_nan=False))
        x1 = draw(st.floats(x0, width, allow_nan=False).filter(lambda v, x0=x0: v > x0))
        y1 = draw(st.floats(y0, height, allow_nan=False).filter(lambda v, y0=y0: v > y0))
        boxes.append((x0, y0, x1, y1))
    return (width, height), num_bins, boxes


@settings(max_examples=200, deadline=None)
@given(image_and_boxes(), st.booleans())
def test_round_trip_within_one_bin(case, seg):
    size, num_bins, boxes = case
    text = "Look: " + encode_grounded(["thing"], [boxes], size, num_bins=num_bins, seg=seg) + "."
    parsed = parse_grounded(text, size, num_bins=num_bins)
    assert parsed.num_dropped == 0
    assert parsed.text == "Look: thing."
    assert len(parsed.spans) == 1 and parsed.spans[0].phrase == "thing"
    assert parsed.spans[0].seg == [seg] * len(boxes)
    bin_w, bin_h = size[0] / num_bins, size[1] / num_bins
    for decoded, source in zip(parsed.spans[0].boxes, boxes, strict=True):
        for i, (d, s) in enumerate(zip(decoded, source, strict=True)):
            assert abs(d - s) <= (bin_w if i % 2 == 0 else bin_h) + 1e-6


TOKENS = grounding_tokens(8) + ["<loc_99>", " a", "dog", " ", ".", "<", "p>", "</", "box"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_arbitrary_token_sequences_never_crash(tokens):
    text = "".join(tokens)
    parsed = parse_grounded(text, (64, 48), num_bins=8)
    assert parsed.num_dropped >= 0
    for span in parsed.spans:
        assert len(span.boxes) == len(span.seg) >= 1
        for x0, y0, x1, y1 in span.boxes:
            assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48
    assert "<box>" not in parsed.text and "<loc_" not in parsed.text.replace("<loc_99>", "")


def test_broken_groups_are_dropped_and_counted():
    text = "<p>cat</p><box><loc_1><loc_2></box> and <p>dog</p><box><loc_1><loc_2><loc_3><loc_4></box><seg>"
    parsed = parse_grounded(text, (100, 100), num_bins=10)
    assert parsed.text == "cat and dog"
    assert [s.phrase for s in parsed.spans] == ["dog"]
    assert parsed.spans[0].seg == [True]
    assert parsed.num_dropped == 1
    inverted = parse_grounded("<p>x</p><box><loc_5><loc_5><loc_1><loc_9></box>", (10, 10), num_bins=10)
    assert inverted.spans == [] and inverted.num_dropped == 1


def test_several_instances_after_one_phrase_and_phrase_offsets():
    text = (
        "There are "
        + encode_grounded(["circles"], [[(0, 0, 10, 10), (50, 50, 90, 90)]], (100, 100))
        + " here."
    )
    parsed = parse_grounded(text, (100, 100))
    span = parsed.spans[0]
    assert len(span.boxes) == 2
    assert parsed.text[span.start : span.end] == "circles"


@pytest.mark.parametrize(
    "box, message",
    [
        ((10, 10, 5, 20), "empty or inverted"),
        ((0, 0, 120, 50), "outside the image"),
        ((-5, 0, 10, 10), "outside"),
    ],
)
def test_impossible_boxes_raise(box, message):
    with pytest.raises(ValueError, match=message):
        encode_box(box, (100, 100))
