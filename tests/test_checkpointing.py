"""Atomic checkpoints and exact resume: in-process, after a simulated crash, and after a real SIGKILL."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from grounded_llava.modeling import CheckpointError
from grounded_llava.training.checkpointing import (
    find_latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_training_state,
    trainable_state_dict,
)
from grounded_llava.training.metrics_log import read_metrics
from grounded_llava.training.nonfinite import NonFiniteError

# A complete training program: an MLP with dropout, AdamW, warmup + cosine LambdaLR, data mixed from
# two sources by ResumableSampler through a DataLoader, python/numpy randomness in the step, one
# checkpoint per step. Run as a script for the SIGKILL test, loaded with runpy for the in-process test.
TRAIN_SCRIPT = '''
import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grounded_llava.training import (
    MetricsLogger,
    ResumableSampler,
    find_latest_checkpoint,
    load_training_state,
    save_training_state,
    trainable_state_dict,
)

BATCH, WARMUP, TOTAL = 4, 3, 10


def lr_factor(step):
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def build():
    """Fresh model, optimizer, scheduler, sampler and data; every RNG seeded (a resume restores them)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    model[0].bias.requires_grad_(False)  # a frozen tensor: not saved, rebuilt identically
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    grounding = TensorDataset(torch.randn(16, 8), torch.randn(16, 1))
    chat = TensorDataset(torch.randn(8, 8), torch.randn(8, 1))
    dataset = torch.utils.data.ConcatDataset([grounding, chat])
    # 24 samples per epoch, 6 steps: 10 steps cross an epoch boundary.
    sampler = ResumableSampler(source_sizes=[16, 8], weights=[0.7, 0.3], epoch_length=24, seed=123)
    return model, optimizer, scheduler, sampler, dataset


def train(model, optimizer, scheduler, sampler, dataset, *, step, total, ckpt_dir=None, logger=None, sleep=0.0):
    """Train from `step` to `total`; returns the final step."""
    model.train()
    while step < total:
        loader = DataLoader(dataset, sampler=sampler, batch_size=BATCH, generator=torch.Generator())
        for x, y in loader:
            noise = 0.01 * random.random() + 0.01 * float(np.random.rand())
            loss = nn.functional.mse_loss(model(x + noise), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            sampler.advance(len(x))
            step += 1
            if logger is not None:
                logger.log(step=step, stage="align", metrics={"loss": loss})
            if ckpt_dir is not None:
                save_training_state(
                    ckpt_dir,
                    step=step,
                    model_state=trainable_state_dict(model),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    sampler_state=sampler.state_dict(),
                    extra={"stage": "align"},
                    keep_last=2,
                )
            time.sleep(sleep)
            if step == total:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    model, optimizer, scheduler, sampler, dataset = build()
    ckpt_dir = args.out / "checkpoints"
    latest = find_latest_checkpoint(ckpt_dir)
    step = 0
    if latest is not None:
        state = load_training_state(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        sampler.load_state_dict(state.sampler_state)
        step = state.step
        print(f"resumed from step {step}", flush=True)
    logger = MetricsLogger(args.out / "metrics.jsonl", is_main_process=True, resume_step=step)
    train(model, optimizer, scheduler, sampler, dataset, step=step, total=TOTAL, ckpt_dir=ckpt_dir,
          logger=logger, sleep=args.sleep)
    logger.close()
    save_file(trainable_state_dict(model), args.out / "final.safetensors")


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def script(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "train_mlp.py"
    path.write_text(TRAIN_SCRIPT)
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)  # build() pins one thread for reproducible float sums


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_is_bit_identical_to_uninterrupted_training(script: Path, tmp_path: Path) -> None:
    program = runpy.run_path(str(script))
    build, train = program["build"], program["train"]

    model, optimizer, scheduler, sampler, dataset = build()
    train(model, optimizer, scheduler, sampler, dataset, step=0, total=10)
    uninterrupted = trainable_state_dict(model)

    model, optimizer, scheduler, sampler, dataset = build()
    train(model, optimizer, scheduler, sampler, dataset, step=0, total=5)
    save_training_state(
        tmp_path / "ckpt",
        step=5,
        model_state=trainable_state_dict(model),
        optimizer=optimizer,
        scheduler=scheduler,
        sampler_state=sampler.state_dict(),
    )
    model, optimizer, scheduler, sampler, dataset = build()
    state = load_training_state(
        tmp_path / "ckpt" / "step-000005", model=model, optimizer=optimizer, scheduler=scheduler
    )
    sampler.load_state_dict(state.sampler_state)
    assert state.step == 5 and sampler.position == 20 and sampler.epoch == 0
    train(model, optimizer, scheduler, sampler, dataset, step=state.step, total=10)
    _assert_same_weights(trainable_state_dict(model), uninterrupted)

    # Without restoring the RNG the dropout masks differ, so the comparison above can fail.
    model, optimizer, scheduler, sampler, dataset = build()
    state = load_training_state(
        tmp_path / "ckpt" / "step-000005",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        restore_rng=False,
    )
    sampler.load_state_dict(state.sampler_state)
    train(model, optimizer, scheduler, sampler, dataset, step=5, total=10)
    assert not torch.equal(trainable_state_dict(model)["3.weight"], uninterrupted["3.weight"])


def test_sigkill_mid_training_loses_nothing(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, str(script), "--out", str(killed_dir), "--sleep", "0.3"],
        env=env,
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not (killed_dir / "checkpoints" / "step-000004").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "the training run never reached step 4"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed_dir / "final.safetensors").exists()
    interrupted_at = find_latest_checkpoint(killed_dir / "checkpoints", cleanup=False)
    assert interrupted_at is not None and 4 <= int(interrupted_at.name.removeprefix("step-")) < 10

    resumed = subprocess.run(
        [sys.executable, str(script), "--out", str(killed_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "resumed from step" in resumed.stdout
    runpy.run_path(str(script))["main"](["--out", str(tmp_path / "ref")])  # uninterrupted, in-process
    _assert_same_weights(
        load_file(killed_dir / "final.safetensors"), load_file(tmp_path / "ref" / "final.safetensors")
    )
    assert [r["step"] for r in read_metrics(killed_dir / "metrics.jsonl")] == list(range(1, 11))
    assert [step for step, _ in list_checkpoints(killed_dir / "checkpoints")] == [9, 10]
    assert not [p for p in (killed_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def _tiny_setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _save(root: Path, step: int, **kwargs) -> Path:
    model, optimizer, scheduler = _tiny_setup()
    return save_training_state(
        root,
        step=step,
        model_state=trainable_state_dict(model),
        optimizer=optimizer,
        scheduler=scheduler,
        **kwargs,
    )


def test_checkpoint_holds_trainable_tensors_and_bn_buffers_only(tmp_path: Path) -> None:
    path = _save(tmp_path, 7, extra={"stage": "align"})
    assert path == tmp_path / "step-000007"
    assert sorted(load_file(path / "trainable.safetensors")) == [
        "1.bias",
        "1.num_batches_tracked",
        "1.running_mean",
        "1.running_var",
        "1.weight",
        "2.bias",
        "2.weight",
    ]
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    assert trainer_state["format_version"] == 1 and trainer_state["step"] == 7
    assert trainer_state["extra"] == {"stage": "align"} and trainer_state["num_processes"] == 1
    assert (path / "rng_state_0.pt").is_file()


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    _save(tmp_path, 5, keep_last=2, extra={"again": True})
    assert json.loads((tmp_path / "step-000005" / "trainer_state.json").read_text())["extra"] == {
        "again": True
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1, keep_last=1)

    def crash(tmp_dir: Path) -> None:
        (tmp_dir / "adapter.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    with pytest.raises(
        CheckpointError, match=r"step-000002: the checkpoint could not be written \(disk full\)"
    ):
        _save(tmp_path, 2, keep_last=1, write_files=crash)
    assert not (tmp_path / ".tmp-step-000002").exists()  # the half-written copy is removed at once
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # leftover cleaned
    model, optimizer, scheduler = _tiny_setup()
    assert (
        load_training_state(
            tmp_path / "step-000001", model=model, optimizer=optimizer, scheduler=scheduler
        ).step
        == 1
    )


@pytest.mark.parametrize(("what", "tensor"), [("model", "2.weight"), ("optimizer state", "2.exp_avg")])
def test_nonfinite_state_is_refused_before_writing_or_pruning(tmp_path: Path, what: str, tensor: str) -> None:
    for step in (1, 2):
        _save(tmp_path, step, keep_last=2)
    model, optimizer, scheduler = _tiny_setup()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    state = trainable_state_dict(model)
    if what == "model":
        state["2.weight"][0, 0] = float("inf")
    else:
        optimizer.state[model[2].weight]["exp_avg"][0, 0] = float("nan")
    with pytest.raises(
        NonFiniteError, match=rf"step-000003: refusing to save: {what} tensor '{tensor}' holds 1"
    ):
        save_training_state(
            tmp_path, step=3, model_state=state, optimizer=optimizer, scheduler=scheduler, keep_last=2
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_find_latest_on_missing_or_empty_dir(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert find_latest_checkpoint(tmp_path) is None


def test_other_format_version_raises_naming_file_and_versions(tmp_path: Path) -> None:
    path = _save(tmp_path, 3)
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["format_version"] = 99
    state_file.write_text(json.dumps(state))
    model, optimizer, scheduler = _tiny_setup()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: format_version 99 .*\(1\)") as error:
        load_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert str(state_file) in str(error.value)


def test_checkpoint_of_another_model_raises_naming_file(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    other = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors: lacks trainable tensors"):
        load_training_state(path, model=other)


def test_unserialisable_extra_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON-serialisable"):
        _save(tmp_path, 1, extra={"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
