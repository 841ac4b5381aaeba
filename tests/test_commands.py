"""The command lines: one console script over train/infer/evaluate/demo/convert/bench, and answers to --help and argument
mistakes that come before the model stack (torch, transformers) is imported."""

import subprocess
import sys
from pathlib import Path

import pytest

from grounded_llava.commands import main

REPO = Path(__file__).resolve().parents[1]


def imported_modules(*command: str) -> set[str]:
    """The modules a command imports (`python -X importtime`), its exit status checked by the caller."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    return {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }


@pytest.mark.parametrize(
    "command",
    [
        ("infer.py", "--help"),
        ("train.py", "--help"),
        ("-m", "grounded_llava.evaluate", "--help"),
        ("-m", "grounded_llava.demo", "--help"),
        ("-m", "grounded_llava.convert", "--help"),
        ("-m", "grounded_llava.convert", "--from-llava", "no-such-dir", "--out", "o"),
        ("infer.py", "--image", "no-such-image.png", "--prompt", "Where?"),
        ("-m", "grounded_llava.commands", "infer", "--image", "no-such-image.png", "--prompt", "Where?"),
        ("-m", "grounded_llava.commands", "bench", "--help"),
    ],
)
def test_help_and_argument_mistakes_answer_without_loading_torch(command):
    modules = imported_modules(*command)
    assert modules and "argparse" in modules
    assert not {"torch", "transformers", "ultralytics", "peft", "gradio"} & modules


def test_the_console_script_dispatches_to_each_command(capsys):
    assert main(["infer", "--image", "no-such-image.png", "--prompt", "Where?"]) == 2
    assert (
        capsys.readouterr().err.strip() == "grounded-llava infer: error: no image matches 'no-such-image.png'"
    )
    assert main(["predict"]) == 2
    assert "unknown command 'predict'" in capsys.readouterr().err
    assert main([]) == 2 and "usage: grounded-llava" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "usage: grounded-llava train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])  # bench/run.py of this clone: --out is required
    assert exit_info.value.code == 2 and "usage: grounded-llava bench" in capsys.readouterr().err


def test_one_error_policy_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from grounded_llava.config_io import ConfigError
    from grounded_llava.convert.weights import ConversionError
    from grounded_llava.data.bad_data import DataError
    from grounded_llava.demo.session import UploadError
    from grounded_llava.errors import (
        BaseModelUnavailableError,
        CheckpointError,
        UsageError,
        UserError,
        exit_on_user_error,
    )
    from grounded_llava.image_io import ImageReadError
    from grounded_llava.training.nonfinite import NonFiniteError

    kinds = (ConfigError, ConversionError, DataError, UploadError, BaseModelUnavailableError, CheckpointError)
    assert all(issubclass(kind, UserError) for kind in (*kinds, UsageError, ImageReadError, NonFiniteError))

    def fails(error: BaseException):
        def action() -> int:
            raise error

        return action

    assert exit_on_user_error("prog", fails(ConfigError("run.yaml: field 'train.lr': must be > 0\n"))) == 2
    assert capsys.readouterr().err == "prog: error: run.yaml: field 'train.lr': must be > 0\n"
    assert exit_on_user_error("prog", fails(FileNotFoundError("no image matches 'x*.png'"))) == 2
    assert capsys.readouterr().err == "prog: error: no image matches 'x*.png'\n"
    with pytest.raises(ValueError, match="a bug"):  # not the user's input: the traceback stays
        exit_on_user_error("prog", fails(ValueError("a bug")))
