"""Grounded decoding: LLaVA's autoregressive loop (KV cache, left padding) where every `<box>` the model
writes picks one of the detection head's proposals through the pointer, and the chosen proposal's box
is then forced as the group's four `<loc_k>` tokens and `</box>`.

"none" (the pointer's last option) at a phrase's first `<box>` leaves the four loc tokens to the LM (an
object the head cannot propose); at a later `<box>` of the phrase it ends the phrase's list: that
`<box>` is taken back (masked in the KV cache, its position reused) and the best other token follows,
so a list names what the head proposes instead of boxes the LM invents. A proposal the answer already
cited is excluded (within a phrase as in training, `modeling.pointer.pointer_targets`: "every circle"
lists each circle once; across phrases, so that "crosses and crosses" cites two different crosses).

When the phrase names one of the head's categories ("the red star", "circles": `phrase_class`), the
pointer chooses among the proposals the head labels with that category (and "none"): the text then
names what the head detects, as `reconcile` requires for a match. A phrase that names no category,
or one the head proposes nothing of, keeps every proposal. Of those, the pointer chooses among the
proposals the head reports as detections (score >= `heads.conf_threshold`) when there are any, so a
text box is one of the answer's detections rather than a low-score duplicate or background box.
Text and head agree by construction where the head reports something (E23): inside a phrase, the
tokens that start the name of a category the head reports nothing of are masked (`NameMask`); a
phrase's first `<box>` cannot be "none" when the head reports the class it names; and when the answer
has already cited every reported box of that class, that `<box>` is taken back instead.

A model with a choice pointer (`model.chooser`, set by a `chooser` stage) splits the decision
(`modeling.pointer.pointer_decision`): the pointer says whether a `<box>` is "none", the chooser which
of the options it is.

Frames: proposals are xyxy canvas pixels; `PointerChoice.box` is xyxy ORIGINAL image pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from grounded_llava.codec import box_bins
from grounded_llava.data.phrasing import pluralize
from grounded_llava.image_meta import ImageMeta
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.modeling.copy_head import CopySources
from grounded_llava.modeling.pointer import Proposals, pointer_decision

from .copy_prior import CopyPrior
from .reconciliation import named_categories


@dataclass
class PointerChoice:
    """The pointer's decision at one `<box>`: `position` of the `<box>` token in the answer ids, the
    chosen `proposal` index (None: "none"), its probability, box (original px) and head score."""

    position: int
    proposal: int | None
    probability: float
    box: tuple[float, float, float, float] | None = None
    head_score: float = 0.0


@dataclass
class DecodedAnswers:
    """Per request: the answer's token ids (no eos), the pointer's choices in reading order, each token's
    log-probability under the logits it was chosen from (`log_probs[r][t]` for `ids[r][t]`), and the last
    hidden state (D,) that emitted each `<seg>` (by its position in `ids[r]`: the mask decoder's prompt,
    as in training); `head_outputs`: the Detect head's raw predictions for the batch's images. All that
    grounding needs, kept from generation: no second pass over the answers."""

    ids: list[list[int]]
    choices: list[list[PointerChoice]]
    log_probs: list[list[float]]
    seg_states: list[dict[int, torch.Tensor]]
    head_outputs: object


def _choose(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1)[:, 0]


class _PhraseStates:
    """The mean hidden state of each row's current phrase, as `prompts.pointer_query` reads it in training:
    the states of the tokens between `<p>` and `</p>`, kept for the box groups right after `</p>` (zeros
    for a `<box>` in no phrase). `read` takes the state of the token `wrote` last appended."""

    def __init__(self, batch: int, hidden: torch.Tensor, ids) -> None:
        self.ids = ids
        self.total = hidden.new_zeros((batch, hidden.shape[-1]))
        self.count = [0] * batch
        self.inside = [False] * batch  # between <p> and </p>
        self.grounding = [False] * batch  # after </p>, within its box groups
        self.pending = [False] * batch  # the last written token is phrase content
        self.tokens: list[list[int]] = [[] for _ in range(batch)]  # the current phrase's token ids

    def read(self, hidden: torch.Tensor) -> None:
        for r, pending in enumerate(self.pending):
            if pending:
                self.total[r] += hidden[r]
                self.count[r] += 1
                self.pending[r] = False

    def wrote(self, row: int, token: int) -> None:
        ids = self.ids
        if token == ids.p_open:
            self.total[row].zero_()
            self.count[row], self.inside[row], self.grounding[row] = 0, True, False
            self.tokens[row] = []
        elif token == ids.p_close:
            self.inside[row], self.grounding[row] = False, True
        elif self.inside[row]:
            self.pending[row] = True
            self.tokens[row].append(token)
        elif token not in (ids.box_open, ids.box_close, ids.seg) and token not in ids.loc:
            self.grounding[row] = False

    def queries(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(R, 2D) pointer queries of `rows` (their `<box>` states are `hidden[rows]`)."""
        means = torch.stack([
            self.total[r] / max(self.count[r], 1) if self.grounding[r] else torch.zeros_like(self.total[r])
            for r in rows.tolist()
        ])  # fmt: skip
        return torch.cat([hidden[rows], means], dim=-1)

    def words(self, embed: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """(R, D) the mean input embedding (`embed`: the LLM's embedding layer) of each row's current phrase,
        as `BoxQueries.word_queries` reads it in training: the queries of a pointer that `reads` "words"."""
        means = []
        for r in rows.tolist():
            if self.grounding[r] and self.tokens[r]:
                tokens = torch.tensor(self.tokens[r], device=self.total.device)
                means.append(embed(tokens).mean(0).to(self.total.dtype))
            else:
                means.append(torch.zeros_like(self.total[r]))
        return torch.stack(means)


class NameMask:
    """The tokens that start the name or plural (with or without a leading space) of each category: inside
    a phrase, those of the categories the head reports nothing of are masked (E23). Masking the first token
    sends the LM to another word before it has spelled part of the name (masking later pieces leaves
    fragments: "t" + "angle", E24). A start shared with a reported category's name ("s" of "squares" and
    "stars") is masked too: kept, it let absent names through (agreement 0.93 -> 0.80, E24)."""

    def __init__(self, tokenizer, categories: Sequence[str]) -> None:
        self.starts = []
        self.categories = list(categories)
        for name in categories:
            forms = (name, f" {name}", pluralize(name), f" {pluralize(name)}")
            self.starts.append(
                {ids[0] for f in forms if (ids := tokenizer.encode(f, add_special_tokens=False))}
            )

    def tokens(self, absent: Sequence[int]) -> list[int]:
        """The tokens to mask when the categories `absent` must not be named."""
        return sorted(set().union(*(self.starts[c] for c in absent)))

    def named_in(self, question: str) -> set[int]:
        """The categories whose name or plural is a word of `question`: the user named them, the answer may
        too ("Where is the hexagon?" when the head labels the hexagon "cross"; E24)."""
        return set(named_categories(question, self.categories))


def _absent_categories(proposals: Proposals, num_categories: int, min_score: float) -> list[list[int]]:
    """Per image, the categories that label no proposal the head reports (score >= `min_score`): those a
    `<box>` of a phrase naming them could not cite (`_pointer_options`). The class-aware detections would
    also name the second class of a box whose proposal carries another (E24: agreement 0.91 -> 0.77)."""
    reported = proposals.valid & (proposals.scores >= min_score)
    return [
        sorted(set(range(num_categories)) - set(proposals.class_ids[r][reported[r]].tolist()))
        for r in range(reported.shape[0])
    ]


def _pointer_options(
    proposals: Proposals,
    rows: Sequence[int],
    phrase_ids: Sequence[Sequence[int]],
    phrase_class: Callable[[Sequence[int]], int | None] | None,
    min_score: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) bool: the proposals each row's `<box>` may choose. Those of the class its phrase names
    (`phrase_class` of the phrase's token ids), when the head proposes any; of those, the ones the head
    reports (score >= `min_score`), when there are any; else every valid one. And (R,) bool: the phrase
    names a class the head reports (a phrase's first `<box>` then takes one of them, never "none")."""
    options = proposals.valid[list(rows)].clone()
    named_and_reported = torch.zeros(len(rows), dtype=torch.bool, device=options.device)
    for i, r in enumerate(rows):
        named = None if phrase_class is None or proposals.class_ids is None else phrase_class(phrase_ids[r])
        if named is not None:
            of_class = options[i] & (proposals.class_ids[r] == named)
            if bool(of_class.any()):
                options[i] = of_class
        reported = options[i] & (proposals.scores[r] >= min_score)
        if bool(reported.any()):
            options[i] = reported
            named_and_reported[i] = named is not None and bool(of_class.any())
    return options, named_and_reported


def _step_input(
    llava,
    tokens: torch.Tensor,
    fed_back: list[int | None],
    region_tokens: torch.Tensor | None,
    box_close: int,
) -> dict[str, torch.Tensor]:
    """The LLM input of one decoding step of (B,) `tokens`: their ids, or, when a row's token is the
    `</box>` of a chosen proposal (`fed_back[r]`, then cleared), their embeddings with that proposal's
    region token added (`modeling/region_feedback.py`: as in training)."""
    rows = [r for r, k in enumerate(fed_back) if k is not None and int(tokens[r]) == box_close]
    if not rows:
        return {"input_ids": tokens[:, None]}
    embeddings = llava.get_input_embeddings()(tokens[:, None])
    for r in rows:
        embeddings[r, 0] += region_tokens[r, fed_back[r]].to(embeddings.dtype)
        fed_back[r] = None
    return {"inputs_embeds": embeddings}


@torch.inference_mode()
def decode_grounded(
    model: GroundedLlavaForConditionalGeneration,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    features: torch.Tensor,
    pyramid: list[torch.Tensor],
    pixel_values: torch.Tensor,
    metas: list[ImageMeta],
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    phrase_class: Callable[[Sequence[int]], int | None] | None = None,
    min_score: float = 0.0,
    name_mask: NameMask | None = None,
    copy_prior: CopyPrior | None = None,
    questions: Sequence[str] = (),
) -> DecodedAnswers:
    """Generate answers for a left-padded batch (B, T) whose rows are one image each (`features` (B, N, D),
    `pyramid` the neck's maps of those images, `pixel_values` (B, 3, S, S) their canvas, `metas` their
    geometry). `phrase_class(phrase token ids)` is the head class index a phrase names, or None; None
    for the argument: the pointer chooses among all proposals. `min_score`: the pointer chooses among
    proposals the head scores at least this (its detection threshold), when there are any.
    `name_mask` (of the head's categories): inside a phrase, the tokens that start the name of a category
    the head reports nothing of are masked (unless the row's question names it): the text names what the
    head detects. `copy_prior` with `questions` (each row's last question): inside a phrase, the tokens
    that continue it as the question does gain `copy_prior.bias` (`copy_prior.py`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if copy_prior is not None and len(questions) != input_ids.shape[0]:
        raise ValueError(
            f"the copy prior needs one question per row: {len(questions)} for {input_ids.shape[0]}"
        )
    llava, ids = model.base_llava, model.token_ids
    num_bins = len(ids.loc)
    batch = input_ids.shape[0]
    head_outputs = model.detection_head(pyramid)
    proposals: Proposals = model.proposals(head_outputs)
    masked_names = None  # per row, the name tokens a phrase may not start (fixed for the whole answer)
    if name_mask is not None:
        absent = _absent_categories(proposals, len(name_mask.starts), min_score)
        named = [name_mask.named_in(q) for q in questions] if questions else [set()] * batch
        masked_names = [
            name_mask.tokens([c for c in a if c not in n]) for a, n in zip(absent, named, strict=True)
        ]
    region_map = model.pointer_features(pyramid, pixel_values)
    regions = model.pointer.region_embeddings(region_map, proposals)
    chooser = model.chooser
    choice_regions = None if chooser is None else chooser.region_embeddings(region_map, proposals)
    region_tokens = model.region_tokens(region_map, proposals)
    fed_back: list[int | None] = [None] * batch  # the proposal whose region token goes in with `</box>`
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = llava.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        mm_encoder_outputs=model.mm_encoder_outputs(features, region_tokens),
        use_cache=True,
    )
    cache, hidden = out.cache, out.last_hidden_state[:, -1]
    sources = None if model.copy_head is None else CopySources(  # what each row may copy from (copy_head.py)
        model.copy_head, llava.get_input_embeddings(), out.last_hidden_state, input_ids,
        attention_mask.bool() & (input_ids != model.image_token_id),
    )  # fmt: skip
    next_position = position_ids[:, -1] + 1
    answers: list[list[int]] = [[] for _ in range(batch)]
    log_probs: list[list[float]] = [[] for _ in range(batch)]
    seg_states: list[dict[int, torch.Tensor]] = [{} for _ in range(batch)]
    choices: list[list[PointerChoice]] = [[] for _ in range(batch)]
    forced: list[list[int]] = [[] for _ in range(batch)]
    taken = torch.zeros_like(proposals.valid)  # (B, K): cited earlier in the answer
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    box_open = torch.tensor([ids.box_open], device=input_ids.device)
    phrase = _PhraseStates(batch, hidden, ids)
    listed = [0] * batch  # box groups written since the last `</p>`
    previous, previous_hidden = None, None  # the logits the last tokens were chosen from, and their states
    for step in range(max_new_tokens):
        step_hidden = hidden
        phrase.read(hidden)
        logits_now = llava.lm_head(hidden)
        if sources is not None:
            logits_now = sources.mix(logits_now, hidden)
        for r in range(batch) if copy_prior is not None else ():
            if phrase.inside[r]:
                logits_now[r, copy_prior.boosted(questions[r], phrase.tokens[r])] += copy_prior.bias
        for r in range(batch) if masked_names is not None else ():
            if phrase.inside[r] and masked_names[r]:
                logits_now[r, masked_names[r]] = float("-inf")
        tokens = _choose(logits_now, temperature)
        retracted: list[int] = []
        at_box = [
            r for r in range(batch)
            if answers[r] and answers[r][-1] == ids.box_open and not forced[r] and not finished[r]
        ]  # fmt: skip
        if at_box:
            rows = torch.tensor(at_box, device=hidden.device)
            options, named = _pointer_options(proposals, at_box, phrase.tokens, phrase_class, min_score)
            excluded = taken[rows] | ~options
            queries = phrase.queries(hidden, rows)
            stop = model.pointer(queries, rows, regions, proposals.valid, excluded)
            first = torch.tensor([listed[r] == 0 for r in at_box], device=stop.device)
            available = (~excluded).any(1)
            stop[named & first & available, -1] = float("-inf")  # the head reports what the phrase names
            cited_all = (named & first & ~available).tolist()  # ... and the answer cited all of it already
            choice = None
            if chooser is not None:  # it reads what its `reads` names, as in training
                read = (
                    phrase.words(llava.get_input_embeddings(), rows) if chooser.reads == "words" else queries
                )
                choice = chooser(read, rows, choice_regions, proposals.valid, excluded)
            best, probability = pointer_decision(stop, choice)
            for r, k, p, done in zip(at_box, best.tolist(), probability.tolist(), cited_all, strict=True):
                position = len(answers[r]) - 1
                if k == proposals.valid.shape[1] and (listed[r] or done):  # "none" after a box: the list ends
                    retracted.append(r)
                    continue
                listed[r] += 1
                if k == proposals.valid.shape[1]:  # "none" for a phrase's first box: the LM writes it
                    choices[r].append(PointerChoice(position=position, proposal=None, probability=p))
                    continue
                box = metas[r].boxes_from_canvas(proposals.boxes[r, k : k + 1].float().cpu())[0]
                width, height = metas[r].original_size
                box = box.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=box.dtype))
                bins = box_bins(tuple(box.tolist()), metas[r].original_size, num_bins)
                forced[r] = [ids.loc[b] for b in bins] + [ids.box_close]
                fed_back[r] = k if model.config.region_feedback else None
                taken[r, k] = True
                choices[r].append(
                    PointerChoice(position, k, p, tuple(box.tolist()), float(proposals.scores[r, k]))
                )
        for r in range(batch):
            if forced[r]:
                tokens[r] = forced[r].pop(0)
        step_log_probs = logits_now.float().log_softmax(-1)
        states = hidden.clone() if retracted else hidden  # per row, the state its token is chosen from
        for (
            r
        ) in retracted:  # take the `<box>` back (masked in the cache, its position reused): the state before
            answers[r].pop()
            log_probs[r].pop()
            attention_mask[r, -1] = 0
            if sources is not None:
                sources.forget_last(r)
            next_position[r] -= 1
            instead = previous[r : r + 1].index_fill(-1, box_open, float("-inf"))
            tokens[r] = _choose(instead, temperature)[0]
            step_log_probs[r], states[r] = instead[0].float().log_softmax(-1), previous_hidden[r]
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        for r, token in enumerate(tokens.tolist()):
            if not finished[r] and token != eos_token_id:
                answers[r].append(token)
                log_probs[r].append(float(step_log_probs[r, token]))
                if token == ids.seg:
                    seg_states[r][len(answers[r]) - 1] = states[r]
                phrase.wrote(r, token)
                if token == ids.p_close:
                    listed[r] = 0
        finished |= tokens == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:  # no state is read after the last token
            break
        attention_mask = torch.cat(
            [attention_mask, (~finished).long()[:, None].to(attention_mask.dtype)], dim=1
        )
        out = llava.model(
            **_step_input(llava, tokens, fed_back, region_tokens, ids.box_close),
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            cache=cache,
            use_cache=True,
        )
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        if sources is not None:
            sources.append(hidden, tokens, ~finished)
        next_position = next_position + 1
        previous, previous_hidden = logits_now, step_hidden
    return DecodedAnswers(answers, choices, log_probs, seg_states, head_outputs)
