"""Exact resume from every kind of checkpoint: the end of a stage (before a stage that adds categories,
one that switches to the LLM, one that adds LoRA training) and the middle of one."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from grounded_llava.config_io import from_dict, load_yaml
from grounded_llava.training.config import TrainConfig
from grounded_llava.training.trainer import Trainer

CONFIG = Path(__file__).resolve().parent / "configs" / "train_tiny.yaml"


class _Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint was published."""


def _config() -> TrainConfig:
    """heads (2 steps) -> base (1) -> heads with a new category (1) -> ground with another one (2)."""
    data = load_yaml(CONFIG)
    world = {"kind": "synthetic", "dir": "data/old", "num_images": 4, "seed": 1, "image_size": 112,
             "categories": ["circle", "square"], "tasks": {"detect": 1, "find": 1}, "samples_per_image": 1}  # fmt: skip
    data["train"].update(max_steps=6, save_every=1, keep_last=20, eval_samples=2)
    data["stages"] = [
        {"name": "heads", "kind": "heads", "proportion": 2, "batch_size": 2, "train_vision": True,
         "data": [{k: v for k, v in world.items() if k not in ("tasks", "samples_per_image")}]},
        {"name": "base", "kind": "base", "proportion": 1, "data": [{**world, "kind": "synthetic_chat"}]},
        {"name": "new_heads", "kind": "heads", "proportion": 1, "batch_size": 2, "distill_weight": 1.0,
         "data": [{"kind": "synthetic", "dir": "data/new", "num_images": 4, "seed": 2, "image_size": 112,
                   "categories": ["hexagon"]}]},
        {"name": "ground", "kind": "ground", "proportion": 2, "replay_weight": 0.5, "replay_size": 2,
         "data": [{**world, "dir": "data/newer", "seed": 3, "categories": ["star"]}]},
    ]  # fmt: skip
    return from_dict(TrainConfig, data)


def _run(output_dir: Path, kill_after: set[int], monkeypatch) -> None:
    """Train into `output_dir`, stopping right after the checkpoint of each step in `kill_after` (once
    each) and resuming; every stop leaves that checkpoint as the newest one."""
    save = Trainer._save_checkpoint

    def save_then_maybe_die(self, model, optimizer, scheduler, sampler, stage_index, stage_step):
        save(self, model, optimizer, scheduler, sampler, stage_index, stage_step)
        step = self._global_step(stage_index, stage_step)
        if step in kill_after:
            kill_after.discard(step)
            raise _Killed(step)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_maybe_die)
    while True:
        try:
            Trainer(_config(), output_dir).run()
            return
        except _Killed:
            continue


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run / "final").rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(run)}:{k}": v for k, v in load_file(path).items()})
    return tensors


def test_resume_from_every_stage_boundary_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    assert _config().stage_steps() == [2, 1, 1, 2]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _run(reference, set(), monkeypatch)
    # 2, 3, 4: the ends of heads, base and new_heads (step-0 checkpoints of the next stage); 5: mid-ground
    _run(interrupted, {2, 3, 4, 5}, monkeypatch)

    expected, actual = _final_weights(reference), _final_weights(interrupted)
    assert expected.keys() == actual.keys()
    differing = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:3]}"
