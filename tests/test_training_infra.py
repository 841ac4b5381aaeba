"""Sampler (order, sharding, mixing, resume), metrics log, loss plots, accelerate configs, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from accelerate.utils.dataclasses import get_module_class_from_name
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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


# ---------------------------------------------------------------------------------- accelerate configs


def _launch_args(config: Path):
    """What `accelerate launch --config_file <config> train.py` resolves, by accelerate's own code."""
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ddp.yaml", DistributedType.MULTI_GPU),
        ("fsdp.yaml", DistributedType.FSDP),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED),
    ],
)
def test_accelerate_config_loads_and_every_key_is_a_launch_option(
    name: str, expected: DistributedType
) -> None:
    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert isinstance(config, ClusterConfig) and config.distributed_type == expected
    assert config.mixed_precision == "bf16" and config.num_machines == 1
    # A misspelt key inside fsdp_config / deepspeed_config would be silently ignored by accelerate.
    options = set(vars(launch_command_parser().parse_args(["train.py"])))
    nested = list(config.fsdp_config) + list(config.deepspeed_config)
    assert nested == [] or set(nested) <= options, sorted(set(nested) - options)


def test_fsdp_config_wraps_llama_layers_with_orig_params() -> None:
    args, _ = _launch_args(ACCELERATE_CONFIGS / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # The class names to wrap must exist in a LLaVA model, or FSDP's auto wrap fails at prepare().
    text = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    llava = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision))
    for class_name in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):
        assert get_module_class_from_name(llava, class_name) is not None, class_name


def test_deepspeed_config_is_zero2_bf16() -> None:
    args, defaults = _launch_args(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(
        defaults.deepspeed_config
    )  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"


def test_ddp_config_launches_multi_gpu() -> None:
    args, _ = _launch_args(ACCELERATE_CONFIGS / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 8


# ------------------------------------------------------------------------------------ 2-process DDP

DDP_SCRIPT = """
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from grounded_llava.training import ResumableSampler, save_training_state, trainable_state_dict

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
rank = accelerator.process_index
sampler = ResumableSampler(source_sizes=[32], seed=5, num_replicas=accelerator.num_processes, rank=rank)
order, batches = list(sampler), []
for step in range(3):
    batch = order[step * 4 : (step + 1) * 4]
    batches.append(batch)
    loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    sampler.advance(len(batch))
save_training_state(
    out / "checkpoints",
    step=3,
    model_state=trainable_state_dict(accelerator.unwrap_model(model)),
    optimizer=optimizer,
    sampler_state=sampler.state_dict(),
    accelerator=accelerator,
)
save_file(trainable_state_dict(accelerator.unwrap_model(model)), out / f"weights_rank{rank}.safetensors")
info = {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "batches": batches}
(out / f"rank{rank}.json").write_text(json.dumps(info))
accelerator.end_training()
"""


def test_two_process_cpu_ddp_trains_on_rank_shards_with_synced_weights(tmp_path: Path) -> None:
    script = tmp_path / "ddp_smoke.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user default_config.yaml interferes
        "HF_HUB_OFFLINE": "1",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    accelerate_cli = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate_cli), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["world_size"] for i in infos] == [2, 2] and infos[0]["backend"] == "gloo"
    seen = [sum(i["batches"], []) for i in infos]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 24  # disjoint shards
    weights = [load_file(out / f"weights_rank{r}.safetensors") for r in range(2)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key

    # DDP averages the two ranks' gradients: the same as one process on both shards' batches.
    torch.manual_seed(0)
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch0, batch1 in zip(infos[0]["batches"], infos[1]["batches"], strict=True):
        batch = batch0 + batch1
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-5, atol=1e-6)

    checkpoint = out / "checkpoints" / "step-000003"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()


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
