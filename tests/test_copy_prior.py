"""Decoding rules that read words: the copy prior (`CopyPrior`) and the names a phrase may not start
(`NameMask`), on the test tokenizer, which spells " circle" as " c" + "ircle"."""

import pytest

from grounded_llava.inference.copy_prior import CopyPrior
from grounded_llava.inference.decoding import NameMask
from grounded_llava.tokenizer import add_grounding_tokens, train_tiny_tokenizer

QUESTION = "Where is the red square left of the blue circle?"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tiny_tokenizer(512)
    add_grounding_tokens(tokenizer, 16)
    return tokenizer


@pytest.fixture(scope="module")
def prior(tokenizer):
    return CopyPrior(tokenizer, bias=3.0)


def _boosted(prior: CopyPrior, phrase: str) -> set[str]:
    ids = prior.tokenizer.encode(phrase, add_special_tokens=False) if phrase else []
    return {prior.texts[t] for t in prior.boosted(QUESTION, ids)}


def test_the_question_continues_the_phrase_the_lm_started(prior):
    # the phrase's first word is spelled without the question's leading space: they match as text
    assert prior.tokenizer.encode("the", add_special_tokens=False) != prior.tokenizer.encode(
        " the", add_special_tokens=False
    )
    assert " re" in _boosted(prior, "the") and " bl" in _boosted(prior, "the")
    assert " left" in _boosted(prior, "the red square")
    assert _boosted(prior, "the red square") <= {" l", " le", " lef", " left"}
    assert " c" in _boosted(prior, "the blue") and " square" not in _boosted(prior, "the blue")
    assert _boosted(prior, "the red") == {t for t in _boosted(prior, "the red") if " square".startswith(t)}


def test_no_bonus_before_the_lm_starts_the_copy_outside_the_question_or_for_punctuation(prior):
    assert _boosted(prior, "") == set() and _boosted(prior, "t") == set()  # a detect answer's "triangle"
    assert _boosted(prior, "the green") == set()  # the phrase left the question's words
    assert _boosted(prior, "the blue circle") == set()  # what follows is "?": the LM ends the phrase
    assert _boosted(prior, "here is") == set()  # "here" of "Where" is not a word of the question
    assert " bl" in _boosted(prior, " of the")  # a phrase's leading space does not matter


def test_name_mask_masks_the_starts_of_absent_names(tokenizer):
    mask = NameMask(tokenizer, ["circle", "cat", "star"])
    start = lambda text: tokenizer.encode(text, add_special_tokens=False)[0]  # noqa: E731
    assert start(" circle") == start(" cat")  # " c" starts both
    assert start(" star") in mask.tokens([2]) and start(" c") not in mask.tokens([2])
    assert start(" c") in mask.tokens([0]) and start(" c") in mask.tokens([1])  # shared starts are masked
    assert mask.tokens([]) == []


def test_name_mask_knows_the_names_a_question_uses(tokenizer):
    mask = NameMask(tokenizer, ["circle", "cross", "star"])
    assert mask.named_in("Where are the Circles?") == {0}
    assert mask.named_in("Is the star left of the cross?") == {1, 2}
    assert mask.named_in("What is in the picture?") == set()
    assert mask.named_in("Where is the starfish?") == set()  # whole words only
