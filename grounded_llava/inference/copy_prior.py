"""A copy prior for grounded phrases: inside `<p>...</p>`, a logit bonus for the word that continues a span
of the question ("Where is the red diamond?" -> `<p>the red diamond</p>`).

A referring answer names its object in the question's words. A large LM copies them on its own; the tiny
preset's 4-layer LM often does not ("the diamond" -> "the ellipse", "the blue object": docs/EXPERIMENTS.md
E12, E23, E24), and the pointer then reads a phrase that names something else. The prior is a
pointer-generator's copy in its simplest form, on text (lower case), so that a word spelled by other tokens
in the question than in the phrase (" the" there, "the" after `<p>`) still matches: once the LM has
written `MIN_COPIED_CHARS` letters of the phrase itself, and where that text occurs in the question from a
word start, every token that spells a prefix of the question's text after it gains `bias`. The LM starts
the copy: an answer that names what the question does not ("Detect every object." -> `<p>triangle</p>`)
gains nothing, nor does a phrase that has left the question, nor a token without a letter or digit (the
question's "?"): the LM decides where the phrase ends. `bias` 0 turns the prior off.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

MIN_COPIED_CHARS = 3  # the phrase's own start ("the") before the question's words gain the bonus


class CopyPrior:
    """The text (lower case) of every token of a tokenizer, indexed by its first character (built once per
    predictor), and the bonus."""

    def __init__(self, tokenizer, bias: float) -> None:
        self.tokenizer = tokenizer
        self.bias = bias
        special = set(tokenizer.all_special_ids)
        self.texts = [tokenizer.decode([token]).lower() for token in range(len(tokenizer))]
        self.by_first_char: dict[str, list[int]] = defaultdict(list)  # tokens that spell a letter or digit
        for token, text in enumerate(self.texts):
            if token not in special and any(c.isalnum() for c in text):
                self.by_first_char[text[0]].append(token)

    def boosted(self, question: str, phrase: Sequence[int]) -> list[int]:
        """The token ids that continue `phrase` (the ids written since `<p>`) as the `question`'s text does:
        each spells a prefix of the question after an occurrence of the phrase that starts at a word."""
        written = "".join(self.texts[t] for t in phrase).lstrip()
        if len(written) < MIN_COPIED_CHARS:
            return []
        question = question.lower()
        starts = [m.start() for m in re.finditer(r"\b\w", question)]
        following = {question[i + len(written) :] for i in starts if question.startswith(written, i)}
        return sorted({
            t for rest in following for t in self.by_first_char.get(rest[:1], ()) if rest.startswith(self.texts[t])
        })  # fmt: skip
