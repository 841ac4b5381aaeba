"""Decoding rules that read words, not token ids: the copy prior and the names a phrase may not write.

A word is spelled by different tokens in different places (" the" inside a question, "the" right after
`<p>`; " hexagon" in one tokenizer, " hex" + "agon" in another), so both rules work on the tokens' text
(lower case): `TokenTexts` holds it for every token of a tokenizer, built once per predictor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from grounded_llava.data.phrasing import pluralize

MIN_NAME_PREFIX = 3  # letters of a name a token must spell before it is masked ("c" also starts "cyan")


class TokenTexts:
    """The text (lower case) of every token of a tokenizer, indexed by its first character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        self.texts = [tokenizer.decode([token]).lower() for token in range(len(tokenizer))]
        self.by_first_char: dict[str, list[int]] = defaultdict(list)
        for token, text in enumerate(self.texts):
            if token not in special and text:
                self.by_first_char[text[0]].append(token)

    def text(self, tokens: Iterable[int]) -> str:
        return "".join(self.texts[t] for t in tokens)

    def prefixes_of(self, text: str) -> list[int]:
        """The (non-special) tokens whose text is a non-empty prefix of `text`."""
        return [t for t in self.by_first_char.get(text[:1], ()) if text.startswith(self.texts[t])]

    def starting_with(self, text: str) -> list[int]:
        """The (non-special) tokens whose text starts with `text` (non-empty)."""
        return [t for t in self.by_first_char.get(text[:1], ()) if self.texts[t].startswith(text)]


class NameMask:
    """Inside a phrase, the tokens that would spell a category name (or its plural), from its first
    `MIN_NAME_PREFIX` letters on, as a new word or as the continuation of the word being written."""

    def __init__(self, texts: TokenTexts, categories: Sequence[str]) -> None:
        self.texts = texts
        self.forms = [{name.lower(), pluralize(name).lower()} for name in categories]
        self._new_word: dict[tuple[str, str], set[int]] = {}

    def _spelling(self, word: str, form: str, lead: str) -> set[int]:
        """Tokens that turn `word` (the word written so far, after `lead`) into a start of `form` of at
        least `MIN_NAME_PREFIX` letters, or into the whole of it and more ("circle" -> "circles")."""
        rest = lead + form[len(word) :]
        enough = min(MIN_NAME_PREFIX, len(form)) - len(word) + len(lead)
        tokens = {t for t in self.texts.prefixes_of(rest) if len(self.texts.texts[t]) >= enough}
        return tokens | set(self.texts.starting_with(rest))

    def tokens(self, absent: Iterable[int], phrase: Sequence[int]) -> list[int]:
        """The tokens to mask after `phrase` (the ids written since `<p>`) when the categories `absent` must
        not be named."""
        written = self.texts.text(phrase)
        word = "" if not written or written[-1].isspace() else written.split()[-1]
        masked: set[int] = set()
        for category in absent:
            for form in self.forms[category]:
                for lead in (" ", "") if not word else (" ",):
                    if (lead, form) not in self._new_word:
                        self._new_word[lead, form] = self._spelling("", form, lead)
                    masked |= self._new_word[lead, form]
                if word and form.startswith(word) and word != form:
                    masked |= self._spelling(word, form, "")
        return sorted(masked)
