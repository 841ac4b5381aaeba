"""The grounding grammar, read in one place: two lexers (text, token ids) and one parser for both.

Grammar (DESIGN.md "Grounding tokens"):

    answer := (text | phrase group* | group | stray token)*
    phrase := "<p>" text "</p>"
    group  := "<box>" loc loc loc loc "</box>" ["<seg>"]          loc = "<loc_k>", k < num_bins

The four bins of a group are x0, y0, x1, y1. A phrase's groups are the groups after its `</p>`, up
to the next non-blank text or `<p>`.

Positions and frames. A lexer turns a source into `Token`s whose `start`/`end` are positions in
that source: character offsets into the text (`lex_text`), or indices into the id sequence
(`lex_ids`, end = start + 1). `parse` keeps them: every position of a `Parse` is in the frame of
the source it was lexed from, so one answer lexed as text and as ids parses to the same structure
and the positions map through the tokenizer's token -> character offsets.

Lenient (never raises on any token sequence; a broken unit is dropped and counted once in
`Parse.num_dropped`):
- a group is exactly `<box>`, four in-range `<loc_k>`, `</box>`: text or any other grounding token
  inside breaks it, and so does a loc out of range or with over `MAX_BIN_DIGITS` digits;
- a complete group with x1 < x0 or y1 < y0 is inverted: dropped from the spans, but it stays in
  `Parse.groups` (the model reads every complete group, its `<seg>` included);
- `<seg>` belongs to the group whose `</box>` is the token right before it (the model's rule);
  any other `<seg>` is stray;
- `<box>` inside an open phrase breaks the phrase; `<p>` inside one drops the earlier `<p>`;
  `</p>` with no open phrase, `</box>` or `<loc_k>` outside a group are stray; a phrase or group
  still open at the end is dropped;
- valid groups with no phrase before them form a span without a phrase (`Span.open` is None).

One pass over the tokens, constant work per token: linear in the length of the source.
Pure Python (torch only inside `box_groups_in_ids`), so data tooling can use it without the model.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from grounded_llava.tokenizer import GroundingTokenIds

P_OPEN, P_CLOSE = "<p>", "</p>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
SEG = "<seg>"
LOC = "<loc_k>"  # token kind of every `<loc_k>`; its bin is `Token.bin`
TEXT = "text"  # token kind of plain text (a chunk of characters, or one non-grounding id)
# A bin has at most this many digits; longer ones are out of range (and never reach int()).
MAX_BIN_DIGITS = 9
_TOKEN_RE = re.compile(r"<p>|</p>|<box>|</box>|<seg>|<loc_([0-9]+)>")


class Token(NamedTuple):
    """One lexed token: `kind` is P_OPEN, P_CLOSE, BOX_OPEN, BOX_CLOSE, SEG, LOC or TEXT.

    `start`/`end`: its source positions (characters of the text, or `end = start + 1` in ids);
    `bin`: k of a `<loc_k>`, -1 when out of range (or for other kinds); `blank`: whitespace-only text.
    """

    kind: str
    start: int
    end: int
    bin: int = -1
    blank: bool = False


@dataclass(frozen=True)
class BoxGroup:
    """A complete `<box> loc loc loc loc </box>` group; positions in the source frame.

    Attributes:
        start: position of `<box>` (in ids the `<loc_k>` sit at start+1..start+4).
        bins: the four bins (x0, y0, x1, y1), each in [0, num_bins).
        close: position of `</box>` (start + 5 in ids).
        seg_position: position of the `<seg>` right after `</box>`; None when there is none.
    """

    start: int
    bins: tuple[int, int, int, int]
    close: int
    seg_position: int | None = None

    @property
    def seg(self) -> bool:
        return self.seg_position is not None

    @property
    def inverted(self) -> bool:
        x0, y0, x1, y1 = self.bins
        return x1 < x0 or y1 < y0


@dataclass
class Span:
    """A grounded phrase and its valid groups (at least one), positions in the source frame.

    Attributes:
        open: position of `<p>`; None for groups with no phrase before them.
        phrase_start, phrase_end: the phrase's content `[phrase_start, phrase_end)`: right after
            `<p>` and the position of `</p>`; both the first group's `start` when `open` is None.
            Stray tokens inside the phrase are within the range (readers skip non-TEXT tokens).
        groups: its valid box groups in reading order.
    """

    open: int | None
    phrase_start: int
    phrase_end: int
    groups: list[BoxGroup]


@dataclass
class Parse:
    """Result of `parse`.

    Attributes:
        spans: phrases with valid groups, in reading order.
        groups: every complete group (inverted ones too) in reading order: what the model reads.
        num_dropped: broken groups, inverted groups, broken phrases and stray tokens.
    """

    spans: list[Span]
    groups: list[BoxGroup]
    num_dropped: int = 0


def lex_text(text: str, num_bins: int) -> list[Token]:
    """Split text into grounding tokens and the plain-text chunks between them (character offsets)."""
    tokens: list[Token] = []
    append = tokens.append  # runs once per token: positional tuples, no attribute look-ups
    position = 0
    for match in _TOKEN_RE.finditer(text):
        start, end = match.span()
        if start > position:
            append(Token(TEXT, position, start, -1, not text[position:start].strip()))
        digits = match.group(1)
        if digits is None:
            append(Token(match.group(), start, end, -1, False))
        else:
            k = int(digits) if len(digits) <= MAX_BIN_DIGITS else -1
            append(Token(LOC, start, end, k if k < num_bins else -1, False))
        position = end
    if position < len(text):
        append(Token(TEXT, position, len(text), -1, not text[position:].strip()))
    return tokens


def _id_kinds(token_ids: GroundingTokenIds) -> dict[int, tuple[str, int]]:
    kinds = {
        token_ids.p_open: (P_OPEN, -1),
        token_ids.p_close: (P_CLOSE, -1),
        token_ids.box_open: (BOX_OPEN, -1),
        token_ids.box_close: (BOX_CLOSE, -1),
        token_ids.seg: (SEG, -1),
    }
    kinds.update({token: (LOC, k) for k, token in enumerate(token_ids.loc)})
    return kinds


def _lex_id_list(
    ids: Sequence[int], kinds: dict[int, tuple[str, int]], start: int, blank_ids: Container[int]
) -> list[Token]:
    tokens = []
    for position in range(start, len(ids)):
        token = int(ids[position])
        kind, k = kinds.get(token, (TEXT, -1))
        blank = kind == TEXT and token in blank_ids
        tokens.append(Token(kind, position, position + 1, bin=k, blank=blank))
    return tokens


def lex_ids(
    ids: Sequence[int],
    token_ids: GroundingTokenIds,
    *,
    start: int = 0,
    blank_ids: Container[int] = frozenset(),
) -> list[Token]:
    """One token per id of `ids[start:]` (positions index `ids`); non-grounding ids are TEXT.

    `blank_ids`: ids whose text is whitespace only (like blank text, they do not end a phrase's
    list of groups); the default treats every plain id as non-blank.
    """
    return _lex_id_list(ids, _id_kinds(token_ids), start, blank_ids)


def parse(tokens: Sequence[Token]) -> Parse:
    """Spans, complete groups and the dropped count of a lexed stream (rules in the module docstring)."""
    spans: list[Span] = []
    groups: list[BoxGroup] = []
    dropped = 0
    phrase: Token | None = None  # the open `<p>`
    box: list[int] | None = None  # bins of the open group; None when no group is open
    box_start = 0
    current: Span | None = None  # the span that valid groups attach to
    closed: BoxGroup | None = None  # the group closed by the previous token

    for token in tokens:
        kind = token.kind
        just_closed, closed = closed, None
        if box is not None and kind not in (LOC, BOX_CLOSE):  # anything else breaks the open group
            box = None
            dropped += 1
            if kind == SEG:
                continue
        if kind == TEXT:
            if phrase is None and not token.blank:
                current = None
        elif kind == P_OPEN:
            if phrase is not None:  # nested or unclosed: the earlier `<p>` is dropped
                dropped += 1
            phrase, current = token, None
        elif kind == P_CLOSE:
            if phrase is None:
                dropped += 1
            else:
                current = Span(phrase.start, phrase.end, token.start, [])
                phrase = None
        elif kind == BOX_OPEN:
            if phrase is not None:
                dropped += 1
                phrase = None
            box, box_start = [], token.start
        elif kind == LOC:
            if box is None:
                dropped += 1
            else:
                box.append(token.bin)
        elif kind == BOX_CLOSE:
            if box is None:
                dropped += 1
                continue
            bins, box = box, None
            if len(bins) != 4 or min(bins) < 0:
                dropped += 1
                continue
            closed = BoxGroup(box_start, (bins[0], bins[1], bins[2], bins[3]), token.start)
            groups.append(closed)
            if closed.inverted:
                dropped += 1
                continue
            if current is None:
                current = Span(None, box_start, box_start, [])
            if not current.groups:
                spans.append(current)
            current.groups.append(closed)
        elif kind == SEG:
            if just_closed is None:
                dropped += 1
                continue
            with_seg = replace(just_closed, seg_position=token.start)
            groups[-1] = with_seg
            if not just_closed.inverted and current is not None:
                current.groups[-1] = with_seg
    dropped += sum(state is not None for state in (box, phrase))  # still open at the end
    return Parse(spans=spans, groups=groups, num_dropped=dropped)


@dataclass(frozen=True)
class BatchBoxGroups:
    """Every complete box group of a (B, T) id batch, row-major reading order; N groups.

    Attributes:
        rows: (N,) long, the row of each group.
        starts: (N,) long, position of `<box>`; its `<loc_k>` at +1..+4, `</box>` at +5.
        bins: (N, 4) long, (x0, y0, x1, y1) bins in [0, num_bins); inverted groups included.
        seg_positions: (N,) long, position of the `<seg>` right after `</box>`, -1 when none.
        spans: (N,) long, batch-wide index of the span (phrase) a group belongs to, so the groups
            of one phrase share it; -1 for an inverted group (in no span).
        phrase_starts, phrase_ends: (N,) long, the content `[start, end)` of the group's phrase (between
            `<p>` and `</p>`); empty (start == end) for a group without a phrase.
        stray_seg: (M, 2) long, (row, position) of every `<seg>` that follows no group.
    """

    rows: torch.Tensor
    starts: torch.Tensor
    bins: torch.Tensor
    seg_positions: torch.Tensor
    spans: torch.Tensor
    stray_seg: torch.Tensor
    phrase_starts: torch.Tensor
    phrase_ends: torch.Tensor


def box_groups_in_ids(input_ids: torch.Tensor, token_ids: GroundingTokenIds) -> BatchBoxGroups:
    """The groups of every row of `input_ids` (B, T), on its device, through `lex_ids` + `parse`.

    The groups with `seg_positions >= 0`, in order, are the batch's valid `<seg>` tokens in the
    row-major order of `(input_ids == seg).nonzero()`.
    """
    import torch

    kinds = _id_kinds(token_ids)
    rows, starts, bins, seg_positions, spans, stray, phrases = [], [], [], [], [], [], []
    num_spans = 0  # spans of the rows before
    for row, ids in enumerate(input_ids.tolist()):
        tokens = _lex_id_list(ids, kinds, 0, frozenset())
        parsed = parse(tokens)
        span_of = {g.start: num_spans + k for k, span in enumerate(parsed.spans) for g in span.groups}
        phrase_of = {
            g.start: (span.phrase_start, span.phrase_end) for span in parsed.spans if span.open is not None
            for g in span.groups
        }  # fmt: skip
        num_spans += len(parsed.spans)
        found = parsed.groups
        rows += [row] * len(found)
        starts += [g.start for g in found]
        bins += [g.bins for g in found]
        seg_positions += [-1 if g.seg_position is None else g.seg_position for g in found]
        spans += [span_of.get(g.start, -1) for g in found]
        phrases += [phrase_of.get(g.start, (g.start, g.start)) for g in found]
        valid = {g.seg_position for g in found}
        stray += [(row, t.start) for t in tokens if t.kind == SEG and t.start not in valid]

    def long(values: list, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=input_ids.device).reshape(shape)

    return BatchBoxGroups(
        rows=long(rows, (-1,)),
        starts=long(starts, (-1,)),
        bins=long(bins, (-1, 4)),
        seg_positions=long(seg_positions, (-1,)),
        spans=long(spans, (-1,)),
        stray_seg=long(stray, (-1, 2)),
        phrase_starts=long([a for a, _ in phrases], (-1,)),
        phrase_ends=long([b for _, b in phrases], (-1,)),
    )
