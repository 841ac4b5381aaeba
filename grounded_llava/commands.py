"""`grounded-llava train|infer|evaluate|demo|convert|bench ARGS`: the console script; each subcommand is the
same command as `python train.py`, `python infer.py`, `python -m grounded_llava.evaluate|demo|convert` or
`python bench/run.py` (same options and exit codes; `bench` lives in the repository's bench/, beside the
package, so it runs from a clone)."""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

COMMANDS = {
    "train": "grounded_llava.training.command",
    "infer": "grounded_llava.inference.command",
    "evaluate": "grounded_llava.evaluate",
    "demo": "grounded_llava.demo.command",
    "convert": "grounded_llava.convert.command",
    "bench": "bench.run",
}
USAGE = "usage: grounded-llava {train,infer,evaluate,demo,convert,bench} [--help] ARGS"
REPOSITORY = Path(__file__).resolve().parents[1]
"""The clone this package was installed from (editable): bench/ sits there, beside grounded_llava/."""


def _bench(argv: list[str], prog: str) -> int:
    """`bench/run.py` of the clone; exit 2 with one line when the package was installed without one."""
    if not (REPOSITORY / "bench" / "run.py").is_file():
        print(
            f"{prog}: error: the benchmarks live in a clone's bench/ (not in {REPOSITORY}): "
            "pip install -e a clone of the repository",
            file=sys.stderr,
        )
        return 2
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    return import_module(COMMANDS["bench"]).main(argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, *rest = argv
    if name not in COMMANDS:
        print(f"{USAGE}\ngrounded-llava: error: unknown command {name!r}", file=sys.stderr)
        return 2
    if name == "bench":
        return _bench(rest, f"grounded-llava {name}")
    return import_module(COMMANDS[name]).main(rest, prog=f"grounded-llava {name}")


if __name__ == "__main__":
    sys.exit(main())
