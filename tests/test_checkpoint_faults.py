"""Damaged checkpoints and failed writes: one-line errors naming the file, fallback on resume, no lost data.

A truncated or garbage weight file, a heads file for other categories, a damaged optimizer pickle:
each is a `CheckpointError` naming the file, exit 2 from `infer.py`, `evaluate` and `train.py`. A
resume skips a damaged newest checkpoint (warning, renamed `unusable-*`) for the previous one. A
write that fails (disk full) removes its half-written copy and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.evaluate import main as evaluate_main
from grounded_llava.modeling import CheckpointError
from grounded_llava.training import checkpointing
from grounded_llava.training.checkpointing import (
    list_checkpoints,
    load_training_state,
    save_training_state,
    trainable_state_dict,
)
from grounded_llava.training.cli import train_from_cli
from grounded_llava.training.resume import resume_checkpoint

from .conftest import tiny_test_config
from .test_data_coco import _save as _save_coco
from .test_data_coco import _write_dataset

REPO = Path(__file__).resolve().parents[1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a safetensors file" * 4)


DAMAGE = [
    ("heads.safetensors", _truncate),
    ("heads.safetensors", _garbage),
    ("adapter/adapter_model.safetensors", _truncate),
    ("base/model.safetensors", _garbage),
]


def _damaged_copy(checkpoint: Path, tmp_path: Path, relative: str, damage) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    damage(copy / relative)
    return copy


@pytest.mark.parametrize(("relative", "damage"), DAMAGE, ids=[f"{r}-{d.__name__[1:]}" for r, d in DAMAGE])
def test_damaged_weight_file_is_one_line_error_naming_it(random_checkpoint, tmp_path, relative, damage):
    copy = _damaged_copy(random_checkpoint, tmp_path, relative, damage)
    with pytest.raises(CheckpointError) as error:
        GroundedLlavaForConditionalGeneration.from_pretrained(copy)
    text = str(error.value)
    assert text.startswith(f"{copy / relative}: not a readable safetensors file") and "\n" not in text


def test_heads_of_other_categories_name_the_file_and_shapes(random_checkpoint, tmp_path):
    other = GroundedLlavaForConditionalGeneration.from_config(
        tiny_test_config(categories=["a", "b", "c", "d"])
    )
    other.save_pretrained(tmp_path / "other")
    copy = _damaged_copy(random_checkpoint, tmp_path, "heads.safetensors", lambda path: None)
    shutil.copy(tmp_path / "other" / "heads.safetensors", copy / "heads.safetensors")
    with pytest.raises(
        CheckpointError, match=r"heads\.safetensors: detection_head\..* has shape \(4,"
    ) as error:
        GroundedLlavaForConditionalGeneration.from_pretrained(copy)
    assert "another set of categories" in str(error.value) and "\n" not in str(error.value)


def test_clis_exit_2_with_one_line(random_checkpoint, tmp_path, capsys):
    copy = _damaged_copy(random_checkpoint, tmp_path, "heads.safetensors", _truncate)
    spec = importlib.util.spec_from_file_location("infer", REPO / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    data = _save_coco(tmp_path, _write_dataset(tmp_path))
    image = str(tmp_path / "images" / "a.png")
    assert (
        infer.main(["--model", str(copy), "--image", image, "--prompt", "Hi", "--out", str(tmp_path / "o1")])
        == 2
    )
    args = ["--model", str(copy), "--data", str(data), "--images", str(tmp_path / "images")]
    assert evaluate_main([*args, "--out", str(tmp_path / "o2"), "--tasks", "det"]) == 2
    config = yaml.safe_load((REPO / "tests" / "configs" / "train_tiny.yaml").read_text())
    config["init_from"] = str(copy)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert train_from_cli(str(tmp_path / "train.yaml"), str(tmp_path / "run"), []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 3 and all(f"{copy / 'heads.safetensors'}: not a readable" in e for e in errors), (
        lines
    )


# ---------------------------------------------------------------- training checkpoints


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root: Path, step: int, **kwargs) -> Path:
    model, optimizer = _setup()
    state = trainable_state_dict(model)
    return save_training_state(root, step=step, model_state=state, optimizer=optimizer, **kwargs)


@pytest.mark.parametrize(
    ("relative", "damage", "message"),
    [
        ("trainable.safetensors", _garbage, "not a readable safetensors file"),
        ("optimizer.pt", _truncate, "cannot be read (truncated or corrupt?)"),
        ("trainer_state.json", _truncate, "not valid JSON"),
    ],
)
def test_damaged_training_file_is_one_line_error(tmp_path, relative, damage, message):
    path = _save(tmp_path, 1)
    damage(path / relative)
    model, optimizer = _setup()
    with pytest.raises(CheckpointError) as error:
        load_training_state(path, model=model, optimizer=optimizer)
    assert str(error.value).startswith(f"{path / relative}: {message}") and "\n" not in str(error.value)


def test_refused_pickle_does_not_suggest_weights_only_false(tmp_path):
    path = _save(tmp_path, 1)
    torch.save({"state": {}, "param_groups": [], "evil": object()}, path / "optimizer.pt")
    model, optimizer = _setup()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused") as error:
        load_training_state(path, model=model, optimizer=optimizer)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("failing", ["save_file", "torch.save"])
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    _save(tmp_path, 1, keep_last=1)

    def full(*args, **kwargs):
        if failing == "save_file":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpointing, "save_file", full) if failing == "save_file" else None
    monkeypatch.setattr(checkpointing.torch, "save", full) if failing == "torch.save" else None
    with pytest.raises(CheckpointError, match="step-000002: the checkpoint could not be written") as error:
        _save(tmp_path, 2, keep_last=1)
    assert "\n" not in str(error.value) and "the previous one is kept" in str(error.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    model, optimizer = _setup()
    assert load_training_state(tmp_path / "step-000001", model=model, optimizer=optimizer).step == 1


def test_disk_full_in_save_pretrained_replaces_nothing(random_checkpoint, tmp_path, monkeypatch):
    from grounded_llava.modeling import checkpoint

    target = tmp_path / "final"
    shutil.copytree(random_checkpoint, target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(
        CheckpointError, match=r"final: the checkpoint could not be written \(.*No space left"
    ):
        model.save_pretrained(target)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _grounded_checkpoints(root: Path, model) -> None:
    for step in (1, 2):
        _save(root, step, keep_last=None, write_files=lambda tmp: model.save_pretrained(tmp / "model"))


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config())
    _grounded_checkpoints(tmp_path, model)
    _truncate(tmp_path / "step-000002" / "optimizer.pt")
    with caplog.at_level(logging.WARNING):
        path, resumed, state = resume_checkpoint(tmp_path, cleanup=True)
    assert path == tmp_path / "step-000001" and state["step"] == 1
    assert isinstance(resumed, GroundedLlavaForConditionalGeneration)
    assert any(
        "step-000002 is unusable" in r.getMessage() and "optimizer.pt" in r.getMessage()
        for r in caplog.records
    )
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]  # keep_last no longer counts it
    assert (tmp_path / "unusable-step-000002").is_dir()


def test_resume_with_no_usable_checkpoint_refuses_to_start_over(tmp_path):
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config())
    _grounded_checkpoints(tmp_path, model)
    for step in ("step-000001", "step-000002"):
        _garbage(tmp_path / step / "model" / "heads.safetensors")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints can be loaded"):
        resume_checkpoint(tmp_path, cleanup=True)
