"""`grounded-llava train|infer|evaluate|demo|convert ARGS`: the console script; each subcommand is the same
command as `python train.py`, `python infer.py` or `python -m grounded_llava.evaluate|demo|convert` (same
options and exit codes)."""

from __future__ import annotations

import sys
from importlib import import_module

COMMANDS = {
    "train": "grounded_llava.training.command",
    "infer": "grounded_llava.inference.command",
    "evaluate": "grounded_llava.evaluate",
    "demo": "grounded_llava.demo.command",
    "convert": "grounded_llava.convert.command",
}
USAGE = "usage: grounded-llava {train,infer,evaluate,demo,convert} [--help] ARGS"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, *rest = argv
    if name not in COMMANDS:
        print(f"{USAGE}\ngrounded-llava: error: unknown command {name!r}", file=sys.stderr)
        return 2
    return import_module(COMMANDS[name]).main(rest, prog=f"grounded-llava {name}")


if __name__ == "__main__":
    sys.exit(main())
