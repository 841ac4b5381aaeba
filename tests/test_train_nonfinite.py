"""Non-finite losses and weights in a real tiny training run: skipped, logged as null, stopped, never saved.

The NaN is real: a learning rate of 1e30 keeps the weights finite after step 1 (AdamW's first step moves
each by about lr) but overflows every later forward, so from step 2 on every loss is NaN.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grounded_llava.config_io import ConfigError, load_yaml
from grounded_llava.training.checkpointing import list_checkpoints
from grounded_llava.training.cli import train_from_cli
from grounded_llava.training.config import TrainConfig
from grounded_llava.training.nonfinite import NonFiniteError
from grounded_llava.training.trainer import Trainer

CONFIG = Path(__file__).resolve().parent / "configs" / "train_tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these runs are tiny, and threads fighting a busy CPU make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _align_only_config(tmp_path: Path, *, lr: float) -> Path:
    """train_tiny.yaml reduced to its `align` stage (4 images, every step saved), at learning rate `lr`."""
    data = load_yaml(CONFIG)
    stage = data["stages"][0]
    stage["lr"] = lr
    stage["data"][0].update(num_images=4, samples_per_image=1)
    data["stages"] = [stage]
    data["train"].update(save_every=1, keep_last=10, log_every=1, eval_samples=2)
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed as strict JSON (NaN / Infinity are not JSON)."""

    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every weight of a training checkpoint: they are stored once, in its `model/`."""
    assert not (checkpoint / "trainable.safetensors").exists()
    return {
        f"{path.relative_to(checkpoint)}:{key}": tensor
        for path in sorted((checkpoint / "model").rglob("*.safetensors"))
        for key, tensor in load_file(path).items()
    }


def test_nonfinite_losses_are_skipped_logged_as_null_and_stop_the_run_with_exit_2(tmp_path, capsys):
    config = _align_only_config(tmp_path, lr=1e30)
    run = tmp_path / "run"
    code = train_from_cli(str(config), str(run), ["max_steps=12", "train.max_nonfinite_steps=3"])

    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert stderr[-1].startswith(
        "train.py: error: stage 'align': 3 consecutive steps (2-4) had a non-finite loss"
    )
    records = _strict_json_lines(run / "metrics.jsonl")
    assert [(r["step"], r["loss"] is None, r["skipped_nonfinite"]) for r in records] == [
        (1, False, 0), (2, True, 1), (3, True, 1), (4, True, 1),
    ]  # fmt: skip
    assert not (run / "final").exists()
    checkpoints = [path for _, path in list_checkpoints(run / "checkpoints")]
    assert [p.name for p in checkpoints] == ["step-000001", "step-000002", "step-000003"]  # stopped at 4
    first = _tensors(checkpoints[0])
    assert all(torch.isfinite(t).all() for t in first.values())
    for later in checkpoints[1:]:  # a skipped step changes neither the weights nor AdamW's state
        assert all(torch.equal(first[k], v) for k, v in _tensors(later).items())
        optimizer = torch.load(later / "optimizer.pt", weights_only=True)["state"]
        assert all(int(state["step"]) == 1 for state in optimizer.values())


class _NaNInEvalHook(Trainer):
    """Writes a NaN into a weight of the neck in the evaluation hook, as a faulty in-place op would."""

    def evaluate(self, model, datasets):
        with torch.no_grad():
            next(model.neck.parameters()).view(-1)[0] = float("nan")
        return super().evaluate(model, datasets)


def test_a_checkpoint_with_a_nan_weight_is_refused_and_the_earlier_one_kept(tmp_path):
    config = TrainConfig.from_yaml(
        _align_only_config(tmp_path, lr=2e-3), ["max_steps=4", "train.keep_last=1", "train.eval_every=2"]
    )
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step-000002: refusing to save: model tensor '.+' holds 1 NaN"):
        _NaNInEvalHook(config, run).run()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert all(torch.isfinite(t).all() for t in _tensors(run / "checkpoints" / "step-000001").values())
    eval_record = _strict_json_lines(run / "metrics.jsonl")[-1]
    assert eval_record["step"] == 2 and eval_record["eval_det_loss"] is None


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(ConfigError, match="max_nonfinite_steps must be >= 1"):
        TrainConfig.from_yaml(CONFIG, ["train.max_nonfinite_steps=0"])


def test_an_init_from_that_does_not_exist_is_named_with_its_file(tmp_path):
    with pytest.raises(
        ConfigError, match=r"train_tiny\.yaml: field 'init_from': no checkpoint directory .*no-run"
    ):
        TrainConfig.from_yaml(CONFIG, [f"init_from={tmp_path / 'no-run'}"])
    (tmp_path / "a-run").mkdir()
    assert TrainConfig.from_yaml(CONFIG, [f"init_from={tmp_path / 'a-run'}"]).init_from == str(
        tmp_path / "a-run"
    )
