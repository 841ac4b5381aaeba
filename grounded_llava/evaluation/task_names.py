"""The evaluation task names and the `--tasks` parser (no torch: the command line's help reads them)."""

from __future__ import annotations

from grounded_llava.errors import UsageError

TASKS = ("det", "seg", "rec", "res", "find", "chat")


def parse_tasks(text: str) -> tuple[str, ...]:
    """`"det,rec"` -> `("det", "rec")` in `TASKS` order; ValueError naming unknown or missing tasks."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in TASKS]:
        raise UsageError(f"unknown task(s) {unknown} in --tasks; known: {','.join(TASKS)}")
    if not names:
        raise UsageError(f"--tasks names no task; known: {','.join(TASKS)}")
    return tuple(task for task in TASKS if task in names)
