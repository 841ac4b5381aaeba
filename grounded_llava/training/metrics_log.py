"""Training metrics as JSON Lines: one object per line, `{"step", "stage", "time", <metric>: value}`.

Every line is flushed and fsync'ed when written, so a killed run loses at most the line being
written. On resume, `MetricsLogger(path, resume_step=k)` drops the lines with `step > k` (they
belong to steps that will be trained again) and a torn last line, so the log never has a step twice.
Every line is strict JSON: a NaN or infinite value is written as null.
Only the main process writes; the others hold a logger that does nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from .nonfinite import finite_or_none


def _parse_record(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not a JSON object: {error}") from error
    if not isinstance(record, dict) or "step" not in record:
        raise ValueError(f"{path}:{number}: a metrics record must be an object with a 'step' field")
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics file; a malformed line raises, naming the file and the line."""
    with open(path, encoding="utf-8") as f:
        return [_parse_record(Path(path), n, line) for n, line in enumerate(f, start=1) if line.strip()]


def _to_number(name: str, value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return finite_or_none(value) if isinstance(value, float) else value


class MetricsLogger:
    """Appends metrics records to `path` (created with its parents).

    Args:
        is_main_process: only the main process writes (`accelerator.is_main_process`).
        resume_step: when resuming from the checkpoint of this step, drop the records after it.
    """

    def __init__(self, path: str | Path, *, is_main_process: bool, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.is_main_process = is_main_process
        self._file: IO[str] | None = None
        if not is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._rewrite_kept_lines(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed by close()

    def _rewrite_kept_lines(self, resume_step: int | None) -> None:
        """Keep complete lines (and, on resume, those up to `resume_step`); atomic via a temp file."""
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n")]  # a torn last line has no newline
        if resume_step is not None:
            kept = [
                line
                for number, line in enumerate(kept, start=1)
                if line.strip() and _parse_record(self.path, number, line)["step"] <= resume_step
            ]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, *, step: int, stage: str, metrics: Mapping[str, Any]) -> None:
        """Append one record; scalar tensors are converted, NaN/inf written as null."""
        if self._file is None:
            if self.is_main_process:
                raise RuntimeError(f"{self.path}: logger is closed")
            return
        record: dict[str, Any] = {"step": int(step), "stage": stage, "time": time.time()}
        for name, value in metrics.items():
            if name in record:
                raise ValueError(f"metric name {name!r} is reserved (step, stage, time)")
            record[name] = _to_number(name, value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
