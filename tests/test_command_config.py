"""One config style for `infer` and `evaluate` (and `train`): YAML (`--config`), then flags, then `key=value`
overrides, checked by the command's dataclass (`grounded_llava/command_config.py`). No model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from grounded_llava.command_config import config_from_args
from grounded_llava.config_io import ConfigError
from grounded_llava.errors import UsageError
from grounded_llava.evaluation.config import EvaluationConfig
from grounded_llava.inference.command import InferConfig, build_parser


def _infer(argv: list[str]) -> InferConfig:
    return config_from_args(InferConfig, build_parser().parse_intermixed_args(argv))


def test_yaml_then_flags_then_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "infer.yaml"
    config_file.write_text("image: a.png\nprompt: Find every circle.\nconf: 0.3\nbatch_size: 2\nchat: true\n")
    config = _infer(["--config", str(config_file), "--conf", "0.5", "batch_size=4", "chat=false", "out=o"])
    assert config.image == "a.png" and config.prompt == "Find every circle."  # from the YAML
    assert config.conf == 0.5  # the flag over the YAML
    assert config.batch_size == 4 and config.chat is False  # the overrides over both
    assert config.out == Path("o") and isinstance(config.out, Path)  # a path field is a Path


def test_text_overrides_keep_their_text_and_may_sit_between_flags() -> None:
    config = _infer(["image=*.png", "--prompt", "x", "prompt=Is #1 red? yes: it is", "--conf", "0.5"])
    assert config.image == "*.png" and config.prompt == "Is #1 red? yes: it is" and config.conf == 0.5


def test_flags_alone_and_defaults() -> None:
    config = _infer(["--image", "x.png", "--prompt", "Where?", "--masks-for-detections"])
    assert config.masks_for_detections is True and config.chat is False
    assert config.out == Path("outputs/infer") and config.conf is None and config.temperature == 0.0


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--prompt", "Where?"], UsageError, "--image is required"),
        (["--image", "x.png"], UsageError, "--prompt is required"),
        (["--image", "x.png", "--prompt", "Where?", "conf=2"], UsageError, "--conf must be in [0, 1]"),
        (["--image", "x.png", "--prompt", "Where?", "colour=red"], ConfigError, "unknown config key colour"),
        (
            ["--image", "x.png", "--prompt", "Where?", "batch_size=two"],
            ConfigError,
            "batch_size: expected int",
        ),
        (["--image", "x.png", "--prompt", "Where?", "conf=[0.5"], ConfigError, "is not valid YAML"),
    ],
)
def test_bad_options_name_the_option(argv: list[str], error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        _infer(argv)
    assert message in str(raised.value)


def test_a_bad_yaml_value_names_the_file_and_the_key(tmp_path: Path) -> None:
    config_file = tmp_path / "infer.yaml"
    config_file.write_text("image: a.png\nprompt: Where?\ntemperature: hot\n")
    with pytest.raises(ConfigError, match=f"{config_file}: temperature: expected float"):
        _infer(["--config", str(config_file)])
    with pytest.raises(ConfigError) as raised:  # an override's mistake is not the file's
        _infer(["--config", str(config_file), "temperature=0", "batch_size=two"])
    assert str(raised.value).startswith("batch_size: expected int")


def test_evaluation_tasks_from_the_flag_and_from_yaml(tmp_path: Path) -> None:
    from grounded_llava.evaluate import build_parser as evaluate_parser

    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "gt.json").write_text("{}")
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "gt.json")]
    common += ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    flag = config_from_args(EvaluationConfig, evaluate_parser().parse_args([*common, "--tasks", "rec,det"]))
    assert flag.tasks == ("det", "rec")  # the flag's text parsed, in TASKS order
    override = config_from_args(EvaluationConfig, evaluate_parser().parse_args([*common, "tasks=[seg]"]))
    assert override.tasks == ("seg",)
    text = config_from_args(EvaluationConfig, evaluate_parser().parse_args([*common, "tasks=chat,seg"]))
    assert text.tasks == ("seg", "chat")  # the flag's text form works as an override (and in YAML) too
    with pytest.raises(UsageError, match="unknown task"):
        config_from_args(EvaluationConfig, evaluate_parser().parse_args([*common, "--tasks", "det,nope"]))
