"""The grounding grammar: one parser for text and token ids; lenient, linear, and the same answer read
as text and as ids gives the same structure."""

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grounded_llava.codec import encode_grounded, grounding_tokens, parse_grounded
from grounded_llava.grammar import (
    BOX_CLOSE,
    BOX_OPEN,
    P_CLOSE,
    P_OPEN,
    SEG,
    box_groups_in_ids,
    lex_ids,
    lex_text,
    parse,
)
from grounded_llava.inference.grounding import find_box_groups
from grounded_llava.tokenizer import GroundingTokenIds, add_grounding_tokens, train_tiny_tokenizer

NUM_BINS = 8
PLAIN = [" a", "dog", " ", "  ", "."]  # plain pieces that cannot spell a grounding token together
VOCAB = grounding_tokens(NUM_BINS) + PLAIN  # id = index
IDS = GroundingTokenIds(
    p_open=0, p_close=1, box_open=2, box_close=3, seg=4, loc=tuple(range(5, 5 + NUM_BINS))
)
BLANK_IDS = frozenset(VOCAB.index(piece) for piece in PLAIN if not piece.strip())

# Malformed text: grounding tokens, fragments of them, digits, out-of-range and huge bins, prose.
FRAGMENTS = ["<", ">", "p>", "</", "box", "<loc_", "loc_", "_", "0", "7", "42", "<loc_99>", "<loc_-1>"]
HUGE = ["<loc_" + "9" * 5000 + ">", "<loc_" + "1" * 5000, "<loc_0" + "0" * 20 + ">"]
TEXT_PIECES = VOCAB + FRAGMENTS + HUGE + ["é", "\n", "<p><p>", "</box></box>"]


def check_positions(text: str, parsed) -> None:
    """Every position of a text parse points at the token it names (character offsets of `text`)."""
    for group in parsed.groups:
        assert text.startswith(BOX_OPEN, group.start) and text.startswith(BOX_CLOSE, group.close)
        assert group.seg_position is None or text.startswith(SEG, group.seg_position)
        assert all(0 <= b < NUM_BINS for b in group.bins)
    for span in parsed.spans:
        assert span.groups and all(not g.inverted for g in span.groups)
        assert all(g in parsed.groups for g in span.groups)
        if span.open is None:
            assert span.phrase_start == span.phrase_end == span.groups[0].start
        else:
            assert text.startswith(P_OPEN, span.open) and span.phrase_start == span.open + len(P_OPEN)
            assert text.startswith(P_CLOSE, span.phrase_end)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TEXT_PIECES), max_size=60))
def test_malformed_text_yields_spans_and_a_count(pieces):
    text = "".join(pieces)
    parsed = parse(lex_text(text, NUM_BINS))
    assert parsed.num_dropped >= 0
    check_positions(text, parsed)
    answer = parse_grounded(text, (64, 48), num_bins=NUM_BINS)  # the codec reads the same parse
    assert answer.num_dropped == parsed.num_dropped
    assert [len(s.boxes) for s in answer.spans] == [len(s.groups) for s in parsed.spans]
    for span in answer.spans:
        assert answer.text[span.start : span.end].strip() == span.phrase
        for x0, y0, x1, y1 in span.boxes:
            assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48


def test_rules_on_hand_cases():
    def parsed(text):
        return parse(lex_text(text, NUM_BINS))

    good = "<box><loc_1><loc_2><loc_3><loc_4></box>"
    inverted = "<box><loc_5><loc_2><loc_3><loc_4></box>"
    assert parsed(good).num_dropped == 0 and parsed(good).spans[0].open is None
    # An out-of-range or overlong bin breaks its group once; int() never sees 5000 digits.
    for bad in ("<loc_8>", "<loc_" + "9" * 5000 + ">", "<loc_00000000001>"):
        broken = parsed(f"<p>a</p><box>{bad}<loc_2><loc_3><loc_4></box>")
        assert broken.spans == [] and broken.groups == [] and broken.num_dropped == 1
    # An inverted group is dropped with its <seg> (counted once) but stays among the groups read.
    case = parsed(f"<p>a</p>{good}{inverted}<seg>")
    assert case.num_dropped == 1 and [len(s.groups) for s in case.spans] == [1]
    assert not case.spans[0].groups[0].seg and [g.seg for g in case.groups] == [False, True]
    # <seg> belongs to the group right before it: after text it is stray.
    assert parsed(f"<p>a</p>{good} <seg>").num_dropped == 1
    # Blank text keeps the phrase's list of groups open, other text ends it.
    assert [len(s.groups) for s in parsed(f"<p>a</p> {good} {good}").spans] == [2]
    assert [s.open for s in parsed(f"<p>a</p>{good}, {good}").spans] == [0, None]
    # <box> inside an open phrase breaks the phrase, not the group; an unclosed phrase is counted.
    case = parsed(f"<p>a{good}<p>b")
    assert case.num_dropped == 2 and case.spans[0].open is None


@pytest.mark.parametrize("unit", [P_OPEN, "<p>a</p>", "<box><loc_1>", "<loc_"])
def test_linear_time(unit):
    """1 MB of one repeated unit parses in about 10-15x the time of 100 KB (quadratic: 100x; 100 KB
    of `<p>` took 13.6 s before). Best of 3 runs, a generous ratio: the machine may be busy."""

    def seconds(size: int) -> float:
        text = unit * (size // len(unit))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            parse_grounded(text, (100, 100))
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(100_000), seconds(1_000_000)
    assert large < 40 * max(small, 1e-3), (small, large)
    assert large < 10.0, large


def window_groups(ids: list[int]) -> list[tuple[int, tuple[int, ...], bool]]:
    """The rule the model reads `<seg>` prompts with (and find_box_groups had): 6-token windows."""
    bin_of = {token: k for k, token in enumerate(IDS.loc)}
    found = []
    for start in range(len(ids) - 5):
        bins = tuple(bin_of.get(t, -1) for t in ids[start + 1 : start + 5])
        if ids[start] == IDS.box_open and ids[start + 5] == IDS.box_close and min(bins) >= 0:
            found.append((start, bins, start + 6 < len(ids) and ids[start + 6] == IDS.seg))
    return found


id_lists = st.lists(st.integers(0, len(VOCAB) - 1), max_size=60)
# Mostly well-formed runs of groups, so that complete groups and <seg>s actually occur.
group_runs = st.lists(
    st.one_of(
        st.just([IDS.box_open]),
        st.lists(st.sampled_from(IDS.loc), min_size=4, max_size=4).map(
            lambda locs: [IDS.box_open, *locs, IDS.box_close]
        ),
        st.sampled_from([[IDS.seg], [IDS.p_open], [IDS.p_close], [len(VOCAB) - 1], [IDS.loc[0]]]),
    ),
    max_size=20,
).map(lambda chunks: list(itertools.chain.from_iterable(chunks)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(id_lists, group_runs))
def test_id_groups_are_the_models_windows(ids):
    assert [(g.start, g.bins, g.seg) for g in find_box_groups(ids, IDS)] == window_groups(ids)
    assert all(g.close == g.start + 5 for g in find_box_groups(ids, IDS))
    batch = box_groups_in_ids(torch.tensor([ids], dtype=torch.long).reshape(1, -1), IDS)
    windows = window_groups(ids)
    assert batch.starts.tolist() == [start for start, _, _ in windows]
    valid_segs = [start + 6 for start, _, seg in windows if seg]
    assert [c for c in batch.seg_positions.tolist() if c >= 0] == valid_segs
    segs = [c for c, t in enumerate(ids) if t == IDS.seg]
    assert sorted(valid_segs + [c for _, c in batch.stray_seg.tolist()]) == segs


@settings(max_examples=300, deadline=None)
@given(st.one_of(id_lists, group_runs))
def test_text_and_id_parses_agree(ids):
    """One answer as ids and as its text: the same spans, groups and count; positions map by offsets."""
    offsets = list(itertools.accumulate((len(VOCAB[t]) for t in ids), initial=0))
    text = "".join(VOCAB[t] for t in ids)
    by_id = parse(lex_ids(ids, IDS, blank_ids=BLANK_IDS))
    by_text = parse(lex_text(text, NUM_BINS))
    assert by_text.num_dropped == by_id.num_dropped
    to_char = {
        "groups": [(offsets[g.start], g.bins, offsets[g.close], g.seg) for g in by_id.groups],
        "spans": [
            (None if s.open is None else offsets[s.open], offsets[s.phrase_start], offsets[s.phrase_end])
            for s in by_id.spans
        ],
    }
    assert to_char == {
        "groups": [(g.start, g.bins, g.close, g.seg) for g in by_text.groups],
        "spans": [(s.open, s.phrase_start, s.phrase_end) for s in by_text.spans],
    }


def test_tokenizer_ids_and_decoded_text_agree():
    """A real tokenizer: the parse of the ids maps onto the parse of the text by the offset mapping."""
    tokenizer = train_tiny_tokenizer(600)
    token_ids = add_grounding_tokens(tokenizer, 32)
    text = (
        "There are "
        + encode_grounded(
            ["two circles", "a square"],
            [[(1, 2, 30, 40), (50, 50, 60, 70)], [(5, 5, 9, 9)]],
            (100, 100),
            num_bins=32,
            seg=[True, False],
        )
        + ", and <seg> <p>one</p> <box><loc_3><loc_4>"
    )
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    blank = {t for t in encoded.input_ids if not tokenizer.decode([t]).strip()}
    by_id = parse(lex_ids(encoded.input_ids, token_ids, blank_ids=blank))
    by_text = parse(lex_text(text, 32))
    char = [start for start, _ in encoded.offset_mapping] + [len(text)]
    assert [(char[g.start], g.bins, char[g.close], g.seg) for g in by_id.groups] == [
        (g.start, g.bins, g.close, g.seg) for g in by_text.groups
    ]
    assert [char[s.phrase_start] for s in by_id.spans] == [s.phrase_start for s in by_text.spans]
    assert [len(s.groups) for s in by_id.spans] == [2, 1] and by_id.num_dropped == by_text.num_dropped == 2


def test_box_groups_in_ids_matches_the_models_seg_rule():
    """The batch view: every <seg> is either the one after a group (row-major order) or stray."""
    group, dog = [IDS.box_open, 5, 5, 5, 5, IDS.box_close], VOCAB.index("dog")  # bins (0, 0, 0, 0)
    rows = [
        [dog, IDS.box_open, 5, 6, 7, 8, IDS.box_close, IDS.seg, IDS.seg, dog],
        [IDS.seg, IDS.box_open, 12, 11, 10, 9, IDS.box_close, dog, IDS.box_open, 5],
        [*group, *group, dog, IDS.p_open, dog, IDS.p_close, *group, IDS.seg, *group],
    ]
    input_ids = torch.tensor([row + [dog] * (30 - len(row)) for row in rows])
    found = box_groups_in_ids(input_ids, IDS)
    assert found.rows.tolist() == [0, 1, 2, 2, 2, 2] and found.starts.tolist() == [1, 1, 0, 6, 16, 23]
    assert found.bins.tolist() == [[0, 1, 2, 3], [7, 6, 5, 4]] + [[0, 0, 0, 0]] * 4
    assert found.seg_positions.tolist() == [7, -1, -1, -1, 22, -1]
    assert found.spans.tolist() == [0, -1, 1, 1, 2, 2]  # the inverted group is in no span
    # phrase content ranges: only the last two groups follow a <p> dog </p>; the others read none
    assert found.phrase_starts.tolist() == [1, 1, 0, 6, 14, 14]
    assert found.phrase_ends.tolist() == [1, 1, 0, 6, 15, 15]
    assert found.stray_seg.tolist() == [[0, 8], [1, 0]]
    segs = (input_ids == IDS.seg).nonzero().tolist()
    valid = [[r, c] for r, c in zip(found.rows.tolist(), found.seg_positions.tolist(), strict=True) if c >= 0]
    assert sorted(valid + found.stray_seg.tolist()) == segs
    empty = box_groups_in_ids(torch.zeros((2, 0), dtype=torch.long), IDS)
    assert empty.bins.shape == (0, 4) and empty.stray_seg.shape == (0, 2)


def test_pointer_query_is_the_box_state_beside_its_phrases_mean_state():
    """`<p> a b </p> <box> l l l l </box> <box> ...`: both groups read the mean of the phrase's two states."""
    from grounded_llava.modeling.prompts import pointer_query

    hidden = torch.arange(2 * 12 * 2, dtype=torch.float32).reshape(2, 12, 2)
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([4, 10, 3])
    starts, ends = torch.tensor([1, 1, 3]), torch.tensor([3, 3, 3])  # the last group has no phrase
    query = pointer_query(hidden, rows, cols, starts, ends)
    assert query.shape == (3, 4)
    assert torch.equal(query[0], torch.cat([hidden[0, 4], hidden[0, 1:3].mean(0)]))
    assert torch.equal(query[1, 2:], query[0, 2:]) and torch.equal(query[1, :2], hidden[0, 10])
    assert torch.equal(query[2], torch.cat([hidden[1, 3], torch.zeros(2)]))
