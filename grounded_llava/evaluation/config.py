"""`EvaluationConfig`: what `python -m grounded_llava.evaluate` evaluates (no torch: `--help` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grounded_llava.errors import UsageError
from grounded_llava.evaluation.report import REPORT_FILES
from grounded_llava.evaluation.task_names import TASKS, parse_tasks
from grounded_llava.output_paths import check_directory_option, refuse_overwrites

STAGE_MATRIX_FILE = "stage_ap_matrix.json"


def _option(default, text: str, **metadata):
    """A field with a default and its `--help` text (`command_config.py`)."""
    return field(default=default, metadata={"help": text, **metadata})


@dataclass(kw_only=True)
class EvaluationConfig:
    """What to evaluate: the options of `python -m grounded_llava.evaluate` (flags, `--config` YAML or
    `key=value`, `command_config.py`), checked on construction (a missing file or folder, a bad value, an
    output that would overwrite an input: a `UserError` naming the option). Each field's help says what
    it is; `reference` is the checkpoint compared with for `chat_exact_match` and `chat_kl` (`chat_accuracy`
    needs only `chat_data`), `max_images` keeps the first N images by id and N chat entries."""

    model: Path = field(metadata={"help": "checkpoint directory"})
    data: Path = field(metadata={"help": "COCO instances JSON (the ground truth)"})
    images: Path = field(metadata={"help": "folder the JSON's file_names are relative to"})
    out: Path = field(metadata={"help": "output folder for metrics.json / metrics.md"})
    tasks: tuple[str, ...] = _option(TASKS, f"comma-separated subset of {','.join(TASKS)}", parse=parse_tasks)
    chat_data: Path | None = _option(None, "LLaVA conversation JSON for the chat task")
    chat_images: Path | None = _option(None, "image folder of --chat-data (default: --images)")
    reference: Path | None = _option(
        None, "checkpoint to compare chat answers with (e.g. a base stage): chat_exact_match, chat_kl"
    )
    stages: Path | None = _option(None, "training run directory: forgetting across its stages")
    max_images: int | None = _option(None, "evaluate the first N images (by id) and N chat entries")
    batch_size: int = _option(8, "images per forward / generate call")
    max_new_tokens: int = _option(96, "the longest generated answer")
    device: str | None = _option(None, "torch device (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        if unknown := [t for t in self.tasks if t not in TASKS]:
            raise UsageError(f"unknown task(s) {unknown}; known: {','.join(TASKS)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError(
                f"batch_size and max_new_tokens must be >= 1, got {self.batch_size} and {self.max_new_tokens}"
            )
        if self.max_images is not None and self.max_images < 1:
            raise UsageError(f"max_images must be >= 1, got {self.max_images}")
        for name in ("data", "chat_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path} does not exist")
        for name in ("model", "images", "chat_images", "reference", "stages"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path} is not a directory")
        self._check_outputs()

    def _check_outputs(self) -> None:
        """`out` must not be a file, nor any file written into it one of the input files (ValueError)."""
        check_directory_option(Path(self.out), "--out")
        inputs = [
            (Path(p), f"the input --{n.replace('_', '-')}")
            for n in ("data", "chat_data")
            if (p := getattr(self, n))
        ]
        outputs = [(Path(self.out) / name, "output") for name in (*REPORT_FILES, STAGE_MATRIX_FILE)]
        refuse_overwrites(outputs, inputs)
