"""Property tests of the grounding grammar and the codec: any text or id sequence parses without raising,
in time linear in its length; encoding any box either round-trips to within a bin or raises `ValueError`."""

from hypothesis import given, settings
from hypothesis import strategies as st

from grounded_llava.codec import encode_phrase, grounding_tokens, parse_grounded
from grounded_llava.grammar import lex_ids, parse
from grounded_llava.tokenizer import GroundingTokenIds

NUM_BINS = 16
# Grounding tokens, pieces of them and out-of-range bins, which random text rarely spells by itself.
PIECES = [*grounding_tokens(NUM_BINS), "<", ">", "/", "<p", "</", "box>", "<loc_", "<loc_16>", "<loc_-1>",
          "<loc_" + "9" * 40 + ">", "0", "12", " ", "\n", "dog"]  # fmt: skip
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=60).map("".join)
image_sizes = st.tuples(st.integers(0, 5000), st.integers(0, 5000))
IDS = GroundingTokenIds(
    p_open=0, p_close=1, box_open=2, box_close=3, seg=4, loc=tuple(range(5, 5 + NUM_BINS))
)
# Numbers a caller may pass as a box coordinate: any float (NaN, inf included), huge integers.
coordinates = st.one_of(st.floats(), st.integers(-(10**30), 10**30))


@settings(max_examples=300, deadline=2000)
@given(texts, image_sizes)
def test_any_text_parses_into_spans_inside_the_image(text, image_size):
    answer = parse_grounded(text, image_size, num_bins=NUM_BINS)
    width, height = image_size
    assert answer.num_dropped >= 0
    for span in answer.spans:
        assert 0 <= span.start <= span.end <= len(answer.text)
        assert span.phrase == answer.text[span.start : span.end].strip()
        assert len(span.seg) == len(span.boxes) > 0
        for x0, y0, x1, y1 in span.boxes:
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height


@settings(max_examples=300, deadline=2000)
@given(st.lists(st.integers(-3, 2 * NUM_BINS + 8), max_size=80))
def test_any_id_sequence_parses(ids):
    parsed = parse(lex_ids(ids, IDS))
    assert parsed.num_dropped >= 0
    assert all(len(ids) >= g.start + 6 and 0 <= min(g.bins) <= max(g.bins) < NUM_BINS for g in parsed.groups)


@settings(max_examples=25, deadline=2000)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=8).map("".join))
def test_parse_time_is_linear_in_the_length(unit):
    """200 KB of any repeated unit parses well inside the deadline (the quadratic parser took 56 s)."""
    text = unit * (200_000 // len(unit) + 1)
    parse_grounded(text, (640, 480), num_bins=NUM_BINS)


@settings(max_examples=300, deadline=2000)
@given(st.lists(coordinates, max_size=5), image_sizes, st.text(max_size=10))
def test_any_box_round_trips_within_a_bin_or_raises_value_error(box, image_size, phrase):
    try:
        text = encode_phrase(phrase, [box], image_size, num_bins=NUM_BINS)
    except ValueError:
        return
    answer = parse_grounded(text, image_size, num_bins=NUM_BINS)
    assert answer.num_dropped == 0 and len(answer.spans) == 1
    (span,) = answer.spans
    assert span.phrase == phrase.strip() and len(span.boxes) == 1
    width, height = image_size
    clipped = (
        min(max(box[0], 0), width),
        min(max(box[1], 0), height),
        min(box[2], width),
        min(box[3], height),
    )
    for decoded, original, side in zip(span.boxes[0], clipped, (width, height) * 2, strict=True):
        assert abs(decoded - original) <= side / NUM_BINS
