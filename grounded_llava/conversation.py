"""The conversation format of the whole package (LLaVA's): a list of turns `{"from": "human" | "gpt",
"value": str}`, the image attached to the first human turn as `<image>` and a newline before the question."""

from __future__ import annotations

from collections.abc import Iterable

IMAGE_TOKEN = "<image>"


def human_turn(question: str, *, first: bool) -> dict[str, str]:
    """A human turn; the first one of a conversation about an image carries the image token."""
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question}


def conversation(pairs: Iterable[tuple[str, str | None]]) -> list[dict[str, str]]:
    """Turns for (question, answer) pairs in order; an answer None (the turn to generate) adds no gpt turn."""
    turns: list[dict[str, str]] = []
    for index, (question, answer) in enumerate(pairs):
        turns.append(human_turn(question, first=index == 0))
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
    return turns
