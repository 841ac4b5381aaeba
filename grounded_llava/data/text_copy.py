"""Text-only "say this back" conversations: the tiny LM's stand-in for language pre-training.

A real LLaVA's LLM knows every word of its vocabulary and copies a phrase from the question into its
answer out of the box. The tiny preset's LM starts from random weights and learns language only from
the grounding and chat stages, so a word that no image of an earlier stage showed ("ellipse" before the
stage that adds ellipses) has an untrained embedding, and the LM cannot write it when a later stage asks
(docs/EXPERIMENTS.md E12). These conversations ask for phrases of words drawn from the tiny tokenizer's
own corpus (`tokenizer.tiny_tokenizer_corpus`) to be said back: no image, no grounding, no category is
taught, only the words and the copy.
"""

from __future__ import annotations

import random

from ..tokenizer import tiny_tokenizer_corpus
from .sample import GroundedSample

REQUESTS = ("Say {p}.", "Repeat: {p}", "Please write {p}.", "Copy this: {p}", "Say it back: {p}")


def corpus_words() -> list[str]:
    """The distinct words of the tiny tokenizer's corpus (letters only), in first-seen order."""
    words: dict[str, None] = {}
    for line in tiny_tokenizer_corpus():
        for word in line.replace(",", " ").replace(".", " ").replace("?", " ").split():
            if word.isalpha():
                words.setdefault(word.lower(), None)
    return list(words)


def text_copy_samples(count: int, *, seed: int, max_words: int = 6) -> list[GroundedSample]:
    """`count` conversations, deterministic by `seed`: a request to say a phrase of 1..`max_words` corpus
    words (half of them after "the"), answered with the phrase itself."""
    if count < 1 or max_words < 1:
        raise ValueError(f"need count >= 1 and max_words >= 1, got {count}, {max_words}")
    rng = random.Random(seed)
    words = corpus_words()
    samples = []
    for index in range(count):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words)))
        if rng.random() < 0.5:
            phrase = f"the {phrase}"
        request = rng.choice(REQUESTS).format(p=phrase)
        samples.append(
            GroundedSample(
                image_path=None,
                conversation=[{"from": "human", "value": request}, {"from": "gpt", "value": phrase}],
                source=f"text_copy:{seed}:{index}",
                task="text_copy",
            )
        )
    return samples
