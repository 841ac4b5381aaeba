"""A copy prior for grounded phrases: inside `<p>...</p>`, a logit bonus for the word that continues a span
of the question ("Where is the red diamond?" -> `<p>the red diamond</p>`).

A referring answer names its object in the question's words. A large LM copies them on its own; the tiny
preset's 4-layer LM often does not ("the diamond" -> "the ellipse", "the blue object": docs/EXPERIMENTS.md
E12, E23), and the pointer then reads a phrase that names something else. The prior is a pointer-generator
in its simplest form, on text (lower case), so that a word spelled by other tokens in the question than
in the phrase (" the" there, "the" after `<p>`) still matches: where the phrase written so far occurs in
the question, starting at a word, every token that spells a prefix of the question's text after it gains
`bias`; an empty phrase may start at any word of the question. A phrase that has left the question gains
nothing, nor does a token without a letter or digit (the question's "?"): the LM stays free to name what
the question does not, and to end the phrase. `bias` 0 turns the prior off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .token_text import TokenTexts


class CopyPrior:
    """The bonus, and the tokens' text (`TokenTexts`) it reads."""

    def __init__(self, texts: TokenTexts, bias: float) -> None:
        self.texts = texts
        self.bias = bias

    def boosted(self, question: str, phrase: Sequence[int]) -> list[int]:
        """The token ids that continue `phrase` (the ids written since `<p>`) as the `question`'s text does:
        each spells a prefix of the question after an occurrence of the phrase that starts at a word."""
        question = question.lower()
        written = self.texts.text(phrase)
        starts = [m.start() for m in re.finditer(r"\b\w", question)]
        following = {question[i + len(written) :] for i in starts if question.startswith(written, i)}
        tokens = {t for rest in following for t in self.texts.prefixes_of(rest)}
        return sorted(t for t in tokens if any(c.isalnum() for c in self.texts.texts[t]))
