"""`decode_grounded`: at every `<box>` the model writes, the pointer's proposal is forced as the loc tokens.

The tiny model is rigged through its weights (nothing is monkeypatched): with every attention output and
MLP output projection of the LLM zeroed, the last hidden state depends on the current token alone, so the
LM head can be set to a bigram table that writes `<p> circle </p> <box>` and, after every `</box>`, another
`<box>`. The pointer is set to prefer proposals by head score and never to say "none": within the phrase
it must take proposal 0, then 1, then 2 (a chosen proposal is excluded for the rest of the phrase); the
Detect head is set to propose small boxes, so that the proposals' loc tokens differ.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.codec import box_bins
from grounded_llava.inference import GroundedLlava
from grounded_llava.inference.decoding import DecodedAnswers, decode_grounded
from grounded_llava.inference.requests import build_request

from .conftest import tiny_test_config

BOXES_PER_PHRASE = 3


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _rig(model: GroundedLlavaForConditionalGeneration, prompt_end: int, phrase: list[int]) -> list[int]:
    """Set the weights as the module docstring says; returns the answer the LM alone would write (the loc
    tokens left out): `<p> phrase </p>` then `<box>` after `</p>` and after every `</box>`. Use the model
    inside `model.llava.disable_adapter()` (the LoRA and token-row adapters would override these rows)."""
    ids, llava = model.token_ids, model.base_llava
    parameters = dict(llava.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            if "language_model" in name and ("o_proj" in name or "down_proj" in name):
                parameter.zero_()
        chain = [prompt_end, ids.p_open, *phrase, ids.p_close]
        bigrams = list(zip(chain, [*chain[1:], ids.box_open], strict=True)) + [(ids.box_close, ids.box_open)]
        with model.llava.disable_adapter():
            states = {
                t: llava.model(input_ids=torch.tensor([[t]])).last_hidden_state[0, -1] for t, _ in bigrams
            }
        head = parameters["lm_head.token_adapter.base_layer.weight"]
        for _, following in bigrams:
            head[following] = 0.0
        for current, following in bigrams:
            head[following] += 5.0 * states[current] / states[current].norm()
        pointer = model.pointer
        pointer.query[-1].weight.zero_(), pointer.query[-1].bias.fill_(1.0)  # every query: the ones vector
        pointer.region[-1].weight.zero_(), pointer.region[-1].bias.zero_()  # regions: geometry only ...
        pointer.geometry[0].weight.zero_(), pointer.geometry[0].bias.zero_()
        pointer.geometry[0].weight[:, 8] = 1000.0  # ... of the head score alone (geometry's last input)
        pointer.geometry[-1].weight.copy_(torch.eye(pointer.geometry[-1].weight.shape[0]))
        pointer.geometry[-1].bias.zero_()
        pointer.none.fill_(-100.0)
        for box_branch in model.detection_head.detect.cv2:  # small boxes around the anchors (DFL favours
            reg_max = box_branch[-1].bias.numel() // 4  # the low bins): proposals that differ from each other
            box_branch[-1].bias.copy_(-0.5 * torch.arange(reg_max, dtype=torch.float32).repeat(4))
    return chain[1:] + [ids.box_open]


def _decode(model, batch, features, pyramid, max_new_tokens: int, **options) -> DecodedAnswers:
    """`decode_grounded` of a collated batch, greedy; `options`: its `phrase_class` / `min_score`."""
    tokenizer = model.processor.tokenizer
    return decode_grounded(
        model,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        features=features,
        pyramid=pyramid,
        pixel_values=batch.pixel_values,
        metas=batch.image_metas,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


@pytest.fixture(scope="module")
def rigged():
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config()).eval()
    processor = model.processor
    images = [_image(140, 90, seed=1), _image(64, 128, seed=2)]
    prompts = ["Where is the circle?", "Find every circle in this picture, please."]
    encoded = [
        processor.encode_conversation(
            [{"from": "human", "value": f"<image>\n{prompt}"}], image, add_generation_prompt=True
        )
        for image, prompt in zip(images, prompts, strict=True)
    ]
    ends = {int(e.input_ids[-1]) for e in encoded}
    assert len(ends) == 1  # "ASSISTANT:" ends every prompt
    phrase = processor.tokenizer(" circle", add_special_tokens=False).input_ids
    expected_lm = _rig(model, ends.pop(), phrase)
    return model, images, prompts, encoded, expected_lm


def test_decode_grounded_forces_the_chosen_proposals_box_after_box(rigged):
    model, images, _, encoded, expected_lm = rigged
    ids, processor = model.token_ids, model.processor
    batch = processor.collate(encoded, padding_side="left")
    assert len({len(e.input_ids) for e in encoded}) == 2  # left padding is exercised
    max_new_tokens = len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE
    with torch.no_grad(), model.llava.disable_adapter():
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        decoded = _decode(model, batch, features, pyramid, max_new_tokens)
    assert (proposals.valid.sum(1) > BOXES_PER_PHRASE).all()
    forced_bins = []
    for row, (answer, choices, meta) in enumerate(
        zip(decoded.ids, decoded.choices, batch.image_metas, strict=True)
    ):
        assert answer[: len(expected_lm)] == expected_lm and len(answer) == max_new_tokens
        positions = [p for p, token in enumerate(answer) if token == ids.box_open]
        assert positions == [len(expected_lm) - 1 + 6 * k for k in range(BOXES_PER_PHRASE)]
        assert [c.position for c in choices] == positions
        # Score order, each proposal once per phrase ("none" is never chosen: its logit is -inf-like).
        assert [c.proposal for c in choices] == list(range(BOXES_PER_PHRASE))
        for choice in choices:
            k = choice.proposal
            box = meta.boxes_from_canvas(proposals.boxes[row, k : k + 1].float())[0]
            width, height = meta.original_size
            box = box.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=box.dtype))
            bins = box_bins(tuple(box.tolist()), meta.original_size, processor.num_bins)
            forced_bins.append(tuple(bins))
            start = choice.position + 1
            assert answer[start : start + 5] == [ids.loc[b] for b in bins] + [ids.box_close]
            np.testing.assert_allclose(choice.box, box.numpy(), atol=1e-4)
            assert choice.head_score == pytest.approx(float(proposals.scores[row, k]))
            assert 0.0 < choice.probability <= 1.0
    assert len(set(forced_bins)) == len(forced_bins)  # six different boxes: a wrong proposal would show


def test_predictor_answers_carry_the_pointers_boxes_and_scores(rigged):
    """`GroundedLlava` on the rigged model, whose categories here do not include "circle" (the phrase then
    names no head class: no class restriction and no name masking, which have tests of their own): the
    k-th text box is the k-th proposal, exact box (original pixels), scored pointer probability (~1 here)
    x head score; the head reports nothing at conf 0.99: unmatched."""
    model, images, prompts, _, expected_lm = rigged
    model = copy.deepcopy(model)
    model.config.heads.conf_threshold = 0.99
    model.config.heads.categories = ["ring" if c == "circle" else c for c in model.config.heads.categories]
    predictor = GroundedLlava(model, device="cpu")
    with torch.inference_mode(), model.llava.disable_adapter():
        answers = predictor.predict(
            images, prompts, max_new_tokens=len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE
        )
        requests = [
            build_request(predictor.processor, image, prompt, [])
            for image, prompt in zip(images, prompts, strict=True)
        ]
        proposals = model.proposals(model.detection_head(predictor._encode(requests)[1]))
    for row, (answer, request) in enumerate(zip(answers, requests, strict=True)):
        assert answer.text.strip().startswith("circle") and len(answer.detections) == 0
        assert all(s.phrase == "circle" for s in answer.spans) and len(answer.spans) >= BOXES_PER_PHRASE
        width, height = request.meta.original_size
        for k, span in zip(range(BOXES_PER_PHRASE), answer.spans, strict=False):
            assert span.source == "text"
            box = request.meta.boxes_from_canvas(proposals.boxes[row, k : k + 1].float())[0]
            box = box.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=box.dtype))
            np.testing.assert_allclose(span.box, box.numpy(), atol=1e-3)
            assert span.score == pytest.approx(float(proposals.scores[row, k]), rel=1e-3)


def test_a_phrase_cannot_name_a_class_the_head_reports_nothing_of(rigged):
    """The rigged LM writes " circle" after `<p>` (" c" + "ircle" in the test tokenizer); with "circle" a head
    category and nothing reported (conf 0.99), the phrase cannot start it and names something else, unless
    the question itself names circles; at conf 0 (every proposal reported) it names the circle again."""
    model, images, _, _, expected_lm = rigged
    model = copy.deepcopy(model)
    cases = (("What is in the picture?", 0.99, False), ("Where is the circle?", 0.99, True),
             ("What is in the picture?", 0.0, True))  # fmt: skip
    for question, threshold, named in cases:
        model.config.heads.conf_threshold = threshold
        predictor = GroundedLlava(model, device="cpu")
        with torch.inference_mode(), model.llava.disable_adapter():
            requests = [build_request(predictor.processor, images[0], question, [])]
            features, pyramid = predictor._encode(requests)
            decoded = predictor._generate(requests, features, pyramid, max_new_tokens=len(expected_lm) + 2,
                                          temperature=0.0)  # fmt: skip
        answer = decoded.ids[0]
        assert answer[0] == model.token_ids.p_open
        closed = answer.index(model.token_ids.p_close) if model.token_ids.p_close in answer else len(answer)
        phrase = model.processor.tokenizer.decode(answer[1:closed])
        assert ("circle" in phrase) == named, (question, threshold, phrase)


def test_with_the_copy_prior_the_phrase_copies_the_question(rigged):
    """The rigged LM writes `<p> circle</p>`; asked "Is the circle below the square?" with a large
    `copy_bias`, the phrase it started goes on with the question's words up to the "?" instead of ending;
    with no bias it ends after " circle" (every proposal reported: no name is masked)."""
    model, images, _, _, _ = rigged
    model = copy.deepcopy(model)
    model.config.heads.conf_threshold = 0.0
    question = "Is the circle below the square?"
    for bias, phrase_expected in ((1000.0, " circle below the square"), (0.0, " circle")):
        model.config.copy_bias = bias
        predictor = GroundedLlava(model, device="cpu")
        with torch.inference_mode(), model.llava.disable_adapter():
            requests = [build_request(predictor.processor, images[0], question, [])]
            features, pyramid = predictor._encode(requests)
            answer = predictor._generate(requests, features, pyramid, max_new_tokens=12, temperature=0.0).ids[
                0
            ]
        text = model.processor.tokenizer.decode(answer).lower()  # the prior matches words in any case
        assert text.startswith(f"<p>{phrase_expected}</p>"), text


def test_none_after_a_phrases_first_box_ends_its_list(rigged):
    """The pointer prefers "none" to every proposal but the best one: the phrase's first `<box>` takes
    proposal 0, the second `<box>` is taken back (no LM-written box follows) and the answer goes on (the
    rigged LM then repeats its phrase: each new list again ends after one box; proposal 0 is cited once
    in the answer, so a repeated phrase's first `<box>` gets "none" and the LM's box).
    (One request: the "none" logit sits between the image's best two proposal scores.)"""
    model, images, _, encoded, expected_lm = rigged
    model = copy.deepcopy(model)
    ids, processor = model.token_ids, model.processor
    batch = processor.collate(encoded[1:], padding_side="left")
    max_new_tokens = len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE
    with torch.no_grad(), model.llava.disable_adapter():
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        scores = model.proposals(model.detection_head(pyramid)).scores  # (B, K), best first
        assert float(scores[0, 1]) < float(scores[0, 0])
        model.pointer.none.fill_(500.0 * float(scores[0, 1] + scores[0, 0]))
        decoded = _decode(model, batch, features, pyramid, max_new_tokens)
    for answer, choices in zip(decoded.ids, decoded.choices, strict=True):
        first_box_end = len(expected_lm) - 1 + 5
        assert answer[: first_box_end + 1] == [*expected_lm, *answer[len(expected_lm) : first_box_end + 1]]
        assert answer[first_box_end] == ids.box_close
        assert answer[first_box_end + 1] != ids.box_open  # the second `<box>` was taken back
        assert choices[0].proposal == 0 and all(c.proposal is None for c in choices[1:])
        boxes = [p for p, token in enumerate(answer) if token == ids.box_open]
        assert all(answer[p - 1] == ids.p_close for p in boxes)  # every list ends after one box


def test_a_phrase_naming_a_class_points_only_at_proposals_of_that_class(rigged):
    """`phrase_class` (given the phrase's token ids) names the class of row 0's second proposal: every box
    of that row is a proposal of that class, in score order; row 1, whose head proposes nothing of it, is
    unchanged (every proposal stays an option)."""
    model, images, _, encoded, expected_lm = rigged
    ids, processor = model.token_ids, model.processor
    phrase = expected_lm[1 : expected_lm.index(ids.p_close)]
    batch = processor.collate(encoded, padding_side="left")
    with torch.no_grad(), model.llava.disable_adapter():
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        class_ids = proposals.class_ids.masked_fill(~proposals.valid, -1)
        named = int(class_ids[0, 1])
        class_ids[1][class_ids[1] == named] = -2  # row 1: nothing of the named class
        proposals.class_ids.copy_(class_ids)
        seen = []
        model.proposals = lambda raw: proposals  # the head's proposals, relabelled as above

        def phrase_class(phrase_ids):
            seen.append(list(phrase_ids))
            return named

        decoded = _decode(
            model,
            batch,
            features,
            pyramid,
            len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE,
            phrase_class=phrase_class,
        )
        del model.proposals
    assert seen and all(s == phrase for s in seen)
    of_class = [k for k in range(class_ids.shape[1]) if int(class_ids[0, k]) == named]
    assert [c.proposal for c in decoded.choices[0]] == of_class[:BOXES_PER_PHRASE]
    assert [c.proposal for c in decoded.choices[1]] == list(range(BOXES_PER_PHRASE))


def test_the_pointer_chooses_among_the_proposals_the_head_reports(rigged):
    """With `min_score` (the head's detection threshold) between the second and third proposal's score of
    row 0, row 0's list is proposals 0 and 1 and ends there (only "none" is left; the rigged LM may then
    start another phrase), never proposal 2; a row whose proposals all score below it keeps every one."""
    model, images, _, encoded, expected_lm = rigged
    processor = model.processor
    batch = processor.collate(encoded, padding_side="left")
    with torch.no_grad(), model.llava.disable_adapter():
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        min_score = float(proposals.scores[0, 1])
        assert float(proposals.scores[0, 2]) < min_score
        decoded = _decode(
            model, batch, features, pyramid, len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE, min_score=min_score
        )
    for row, choices in enumerate(decoded.choices):
        reported = [k for k in range(proposals.valid.shape[1])
                    if proposals.valid[row, k] and float(proposals.scores[row, k]) >= min_score]  # fmt: skip
        chosen = [c.proposal for c in choices]
        if reported:
            assert chosen[: min(len(reported), BOXES_PER_PHRASE)] == reported[:BOXES_PER_PHRASE]
            assert set(chosen) - {None} <= set(reported)  # a later phrase: all cited, "none": the LM's box
        else:
            assert chosen[:BOXES_PER_PHRASE] == list(range(BOXES_PER_PHRASE))
    assert [c.proposal for c in decoded.choices[0]][:2] == [0, 1]


def test_with_a_chooser_the_proposal_comes_from_it_and_none_from_the_pointer(rigged):
    """A chooser rigged to prefer the LOWEST head score: each phrase lists the valid proposals from the
    last one up. A pointer that prefers "none" to everything leaves every box to the LM, whatever the
    chooser prefers."""
    model, images, _, encoded, expected_lm = rigged
    model = copy.deepcopy(model)
    batch = model.processor.collate(encoded, padding_side="left")
    chooser = model.add_chooser()
    with torch.no_grad(), model.llava.disable_adapter():
        rigged_rows = {k: v for k, v in model.pointer.state_dict().items() if not k.startswith("query.0.")}
        chooser.load_state_dict(rigged_rows, strict=False)  # it reads words: its first query layer differs
        chooser.geometry[-1].weight.neg_()  # the region embedding: minus the head score's
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        max_new_tokens = len(expected_lm) - 1 + 6 * BOXES_PER_PHRASE
        decoded = _decode(model, batch, features, pyramid, max_new_tokens)
        model.pointer.none.fill_(1e4)
        none = _decode(model, batch, features, pyramid, max_new_tokens)
    for row, choices in enumerate(decoded.choices):
        last = int(proposals.valid[row].sum()) - 1
        assert [c.proposal for c in choices] == [last - k for k in range(BOXES_PER_PHRASE)]
        assert choices[0].probability == pytest.approx(1.0, abs=1e-3)  # (1 - p_none) x p_choice, both ~sure
    assert all(c.proposal is None for choices in none.choices for c in choices) and all(none.choices)
