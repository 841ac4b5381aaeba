"""`CopyPrior`: inside a phrase, the tokens that continue it as the question's text does are the ones boosted."""

import pytest

from grounded_llava.inference.copy_prior import CopyPrior
from grounded_llava.inference.token_text import NameMask, TokenTexts
from grounded_llava.tokenizer import add_grounding_tokens, train_tiny_tokenizer

QUESTION = "Where is the red square left of the blue circle?"


@pytest.fixture(scope="module")
def prior():
    tokenizer = train_tiny_tokenizer(512)
    add_grounding_tokens(tokenizer, 16)
    return CopyPrior(TokenTexts(tokenizer), bias=3.0)


def _boosted(prior: CopyPrior, phrase: str) -> set[str]:
    ids = prior.texts.tokenizer.encode(phrase, add_special_tokens=False) if phrase else []
    return {prior.texts.texts[t] for t in prior.boosted(QUESTION, ids)}


def test_the_question_continues_the_phrase(prior):
    # the phrase's first word is spelled without the question's leading space: they match as text
    assert " re" in _boosted(prior, "the") and " bl" in _boosted(prior, "the")
    assert " left" in _boosted(prior, "the red square")
    assert _boosted(prior, "the red square") <= {" ", " l", " le", " lef", " left"}
    assert " c" in _boosted(prior, "the blue") and " square" not in _boosted(prior, "the blue")
    # an empty phrase may start at any word of the question, never inside one ("here" of "Where")
    first = _boosted(prior, "")
    assert {"t", "w"} <= first and "he" not in first


def test_no_bonus_outside_the_question_or_for_punctuation(prior):
    assert _boosted(prior, "the green") == set()  # the phrase left the question's words
    assert _boosted(prior, "the blue circle") == set()  # what follows is "?": the LM ends the phrase
    assert _boosted(prior, "the red") == {t for t in _boosted(prior, "the red") if " square".startswith(t)}


def test_name_mask_spells_no_absent_name_from_its_third_letter(prior):
    """The test tokenizer spells " circle" as " c" + "ircle": " c" also starts " cyan", so it stays; "ircle"
    after it would spell the name, and is masked."""
    texts, encode = prior.texts, lambda text: prior.texts.tokenizer.encode(text, add_special_tokens=False)
    mask = NameMask(texts, ["circle", "cross"])

    def masked_after(phrase: str, absent=(0,)) -> set[str]:
        return {texts.texts[t] for t in mask.tokens(absent, encode(phrase))}

    assert encode(" circle") == encode(" c") + encode("ircle")
    new_word = masked_after("the")
    assert all(len(t.strip()) >= 3 and t.startswith(" ") for t in new_word)
    assert all("circles".startswith(t.strip()) or t.strip().startswith("circle") for t in new_word)
    after_c = masked_after("the c")
    assert "ircle" in after_c and not any(t.startswith(("y", "r")) for t in after_c)  # "cyan", "cross"
    assert "ircle" not in masked_after("the c", absent=(1,))  # "cross" absent, "circle" reported
    assert masked_after("the", absent=()) == set()
