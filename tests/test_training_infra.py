"""Sampler (order, sharding, mixing, resume), metrics log, loss plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from grounded_llava.training.metrics_log import MetricsLogger, read_metrics
from grounded_llava.training.plots import ema, loss_keys, plot_loss_curves, stage_starts
from grounded_llava.training.sampler import ResumableSampler

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"

# ------------------------------------------------------------------------------------------- sampler


def test_one_source_epoch_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    sampler = ResumableSampler(source_sizes=[10], seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and len(sampler) == 10
    assert list(ResumableSampler(source_sizes=[10], seed=3)) == first
    assert list(ResumableSampler(source_sizes=[10], seed=4)) != first
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != first


def test_ranks_get_disjoint_equal_shards_of_the_global_order() -> None:
    shards = [list(ResumableSampler(source_sizes=[10], seed=0, num_replicas=3, rank=r)) for r in range(3)]
    order = ResumableSampler(source_sizes=[10], seed=0).global_order(0).tolist()
    assert [len(s) for s in shards] == [3, 3, 3]  # 10 samples, 3 ranks: the 10th is dropped
    assert shards == [order[0:9:3], order[1:9:3], order[2:9:3]]
    with pytest.raises(ValueError, match=r"rank 3 must lie in \[0, num_replicas=3\)"):
        ResumableSampler(source_sizes=[10], seed=0, num_replicas=3, rank=3)


def test_weighted_mixing_gives_exact_source_counts() -> None:
    # Sources of 10 (grounding) and 40 (chat) samples, weights 0.7 / 0.3, 20 samples per epoch:
    # 14 grounding samples (10 distinct in a first pass, then 4 more) and 6 distinct chat samples.
    sampler = ResumableSampler(source_sizes=[10, 40], weights=[0.7, 0.3], epoch_length=20, seed=1)
    order = list(sampler)
    grounding = [i for i in order if i < 10]
    chat = [i for i in order if i >= 10]
    assert len(grounding) == 14 and len(chat) == 6
    assert set(grounding) == set(range(10)) and len(set(chat)) == 6 and max(chat) < 50
    assert max(np.bincount(grounding)) == 2
    # Largest remainder: thirds of 10 -> 4, 3, 3 (the tie goes to the first source).
    assert ResumableSampler(
        source_sizes=[5, 5, 5], weights=[1, 1, 1], epoch_length=10, seed=0
    ).samples_per_source == [
        4,
        3,
        3,
    ]


def test_restored_sampler_continues_with_exactly_the_next_samples() -> None:
    full = list(ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9))
    sampler = ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9)
    sampler.advance(5)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives JSON, as in trainer_state.json
    assert state["epoch"] == 0 and state["position"] == 5 and state["seed"] == 9
    resumed = ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the loop's set_epoch of the same epoch keeps the position
    assert list(resumed) == full[5:] and len(resumed) == 13


def test_resume_on_another_number_of_ranks_neither_loses_nor_repeats() -> None:
    order = ResumableSampler(source_sizes=[16], seed=2).global_order(0).tolist()
    ranks = [ResumableSampler(source_sizes=[16], seed=2, num_replicas=2, rank=r) for r in range(2)]
    consumed = [list(r)[:3] for r in ranks]  # 3 samples per rank = 6 global samples
    for r in ranks:
        r.advance(3)
    single = ResumableSampler(source_sizes=[16], seed=2)
    single.load_state_dict(ranks[0].state_dict())
    assert sorted(consumed[0] + consumed[1] + list(single)) == sorted(order) and list(single) == order[6:]


def test_sampler_state_of_another_order_raises_naming_the_field() -> None:
    state = ResumableSampler(source_sizes=[10], seed=1).state_dict()
    with pytest.raises(ValueError, match=r"'seed' = 1 does not match this sampler's 2"):
        ResumableSampler(source_sizes=[10], seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="exceeds epoch_length 10"):
        ResumableSampler(source_sizes=[10], seed=1).advance(11)


def test_sampler_drives_a_dataloader_and_epochs_advance() -> None:
    data = torch.arange(8)
    sampler = ResumableSampler(source_sizes=[8], seed=0)
    loader = DataLoader(data, sampler=sampler, batch_size=4, generator=torch.Generator())
    batches = []
    for batch in loader:
        batches.append(batch.tolist())
        sampler.advance(len(batch))
    assert sorted(batches[0] + batches[1]) == list(range(8)) and sampler.epoch_finished
    sampler.set_epoch(1)
    assert sampler.position == 0 and len(list(loader)) == 2


# --------------------------------------------------------------------------------------- metrics log


def test_metrics_log_resume_drops_later_steps_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "metrics.jsonl"
    with MetricsLogger(path, is_main_process=True) as logger:
        for step in range(1, 6):
            logger.log(step=step, stage="align", metrics={"loss": torch.tensor(1.0 / step), "lr": 0.1})
    with open(path, "a") as f:
        f.write('{"step": 6, "stage": "al')  # killed mid-write
    with MetricsLogger(path, is_main_process=True, resume_step=3) as logger:
        logger.log(step=4, stage="align", metrics={"loss": 0.5})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] == 0.5 and records[1]["stage"] == "align" and records[3]["loss"] == 0.5
    assert set(records[0]) == {"step", "stage", "time", "loss", "lr"}


def test_metrics_log_writes_nan_and_inf_as_null_in_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, is_main_process=True) as logger:
        logger.log(
            step=1, stage="align", metrics={"loss": float("nan"), "det_loss": torch.tensor(float("inf"))}
        )

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record["loss"] is None and record["det_loss"] is None


def test_metrics_log_only_main_process_writes_and_bad_values_raise(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, is_main_process=False) as logger:
        logger.log(step=1, stage="align", metrics={"loss": 1.0})
    assert not path.exists()
    with MetricsLogger(path, is_main_process=True) as logger:
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            logger.log(step=1, stage="align", metrics={"loss": torch.ones(2)})
        with pytest.raises(TypeError, match="'name' must be a number"):
            logger.log(step=1, stage="align", metrics={"name": "x"})
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(path)


# --------------------------------------------------------------------------------------------- plots


def test_ema_and_key_and_stage_helpers() -> None:
    # smoothing 0.5: ema[1] = (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25) = 1.75 / 0.75
    assert ema([1.0, 3.0], smoothing=0.5) == pytest.approx([1.0, 1.75 / 0.75])
    records = [
        {"step": 1, "stage": "align", "loss": 3.0, "det_loss": 1.0, "lr": 0.1},
        {"step": 2, "stage": "ground", "loss": 2.0, "lm_loss": 1.0, "kl_loss": 0.1},
        {"step": 3, "stage": "ground", "loss": 1.0},
    ]
    assert loss_keys(records) == ["det_loss", "lm_loss", "kl_loss", "loss"]
    assert stage_starts(records) == [(1, "align"), (2, "ground")]


def test_plot_loss_curves_draws_a_png(tmp_path: Path) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    with MetricsLogger(jsonl, is_main_process=True) as logger:
        for step in range(1, 121):
            stage = "align" if step <= 40 else "ground" if step <= 80 else "increment-1"
            base = 2.0 * np.exp(-step / 50)
            metrics = {
                "lm_loss": base + 0.2 * rng.random(),
                "det_loss": 1.5 * base + 0.3 * rng.random(),
                "mask_loss": 0.8 * base + 0.1 * rng.random(),
            }
            if stage == "ground":
                metrics["kl_loss"] = 0.05 + 0.02 * rng.random()
            metrics["total"] = sum(metrics.values())
            logger.log(step=step, stage=stage, metrics=metrics)
    png = plot_loss_curves(jsonl, tmp_path / "plots" / "losses.png")
    image = np.asarray(Image.open(png).convert("L"))
    assert image.shape[0] > 5 * 200 and image.shape[1] > 800  # five subplots stacked
    assert (image < 128).mean() > 0.01  # curves and text drawn, not a blank canvas

    (tmp_path / "no_loss.jsonl").write_text('{"step": 1, "stage": "a", "lr": 0.1}\n')
    with pytest.raises(ValueError, match=r"no_loss\.jsonl: no loss metric"):
        plot_loss_curves(tmp_path / "no_loss.jsonl", tmp_path / "x.png")


def test_a_world_is_read_once_per_process_and_again_when_its_file_changes(tmp_path) -> None:
    from grounded_llava.data import generate_world
    from grounded_llava.training.data_sources import load_instances

    generate_world(tmp_path / "w", num_images=3, seed=0, image_size=64)
    annotations, images = tmp_path / "w" / "annotations.json", tmp_path / "w" / "images"
    first = load_instances(annotations, images, on_bad_data="strict")
    assert load_instances(annotations, images, on_bad_data="strict") is first  # every stage shares it
    assert load_instances(annotations, images, on_bad_data="skip") is not first
    data = json.loads(annotations.read_text())
    data["images"] = data["images"][:2]
    kept = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    annotations.write_text(json.dumps(data))
    os.utime(annotations, ns=(annotations.stat().st_atime_ns, annotations.stat().st_mtime_ns + 10**9))
    changed = load_instances(annotations, images, on_bad_data="strict")
    assert changed is not first and len(changed.images) == 2 and len(first.images) == 3


def test_source_blocks_give_one_source_per_batch_and_keep_the_shares() -> None:
    """`source_block` = batch x ranks: every rank's batch holds one source, the epoch keeps the weights'
    shares in whole blocks, and block 1 is the per-sample mixing order itself."""
    sizes, weights = [30, 50], [0.75, 0.25]
    sampler = ResumableSampler(
        source_sizes=sizes, weights=weights, seed=5, source_block=8, num_replicas=2, rank=1
    )
    assert sampler.epoch_length == 80 and sampler.samples_per_source == [
        64,
        16,
    ]  # 10 blocks: 7.5 -> 8, 2.5 -> 2
    order = sampler.global_order(0)
    sources = (order >= 30).astype(int)
    for block in sources.reshape(-1, 8):
        assert len(set(block.tolist())) == 1, block
    rank_batches = np.asarray(list(sampler)).reshape(-1, 4)  # rank 1's batches of 4
    assert all(len(set((batch >= 30).tolist())) == 1 for batch in rank_batches)
    assert len(set(order[sources == 0].tolist())) == 30 and len(set(order[sources == 1].tolist())) == 16
    mixed = ResumableSampler(source_sizes=sizes, weights=weights, seed=5, epoch_length=80)
    assert (ResumableSampler(source_sizes=sizes, weights=weights, seed=5, source_block=1).global_order(0)
            == mixed.global_order(0)).all()  # fmt: skip
    assert len({tuple(b) for b in (mixed.global_order(0) >= 30).reshape(-1, 8).tolist()}) > 2  # mixed blocks
    with pytest.raises(ValueError, match="whole blocks of 8"):  # 5 samples hold no block of 8
        ResumableSampler(source_sizes=[5], seed=0, source_block=8)


def test_a_sampler_state_resumes_only_with_the_same_source_block() -> None:
    blocked = ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9, source_block=3)
    blocked.advance(6)
    state = json.loads(json.dumps(blocked.state_dict()))
    resumed = ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9, source_block=3)
    resumed.load_state_dict(state)
    assert list(resumed) == list(blocked)
    with pytest.raises(ValueError, match="source_block"):
        ResumableSampler(source_sizes=[12, 6], weights=[2, 1], seed=9).load_state_dict(state)
    legacy = {
        k: v
        for k, v in ResumableSampler(source_sizes=[12, 6], seed=9).state_dict().items()
        if k != "source_block"
    }
    ResumableSampler(source_sizes=[12, 6], seed=9).load_state_dict(legacy)  # saved before source blocks
