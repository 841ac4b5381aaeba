"""The staged training loop: accelerate, resumable checkpoints, metrics JSONL, loss curves, stage manifest.

Output directory layout:
    metrics.jsonl, loss_curves.png       every logged step of every stage
    checkpoints/step-NNNNNN/             resumable state: model/ (save_pretrained) + optimizer, RNG, data position
    stages/<name>/                        the model after each stage (loadable by from_pretrained)
    stages.json                           the stage manifest: what was trained, on what, its metrics
    final/                                the last stage's model + stages.json
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast, set_seed
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from ..config_io import ConfigError
from ..data.dataset import GroundedCollator, GroundedDataset, TrainingBatch
from ..modeling import GroundedLlavaForConditionalGeneration
from ..modeling.base import adapters_disabled, sync_trainable_rows
from .checkpointing import checkpoint_name, save_training_state, trainable_state_dict, write_replica_digest
from .chooser_stage import cache_choice_queries, train_chooser
from .config import StageConfig, TrainConfig
from .data_sources import LoadedSource
from .distribution import check_distribution
from .eval_hook import evaluation_losses, model_kwargs
from .heads_data import HeadsBatch, HeadsDataset, collate_heads
from .metrics_log import MetricsLogger
from .nonfinite import NonFiniteGuard, check_finite, finite_or_none
from .plots import plot_loss_curves
from .resume import resume_checkpoint
from .rng_state import preserved_rng
from .sampler import ResumableSampler, endless_batches
from .schedule import warmup_cosine
from .stage_data import StageData, absolute_source, load_stage_data
from .stage_resume import restore_after_setup, restore_before_setup
from .stages import HeadDistiller, adamw, chat_kl_loss, parameter_groups, set_trainable

MANIFEST = "stages.json"
logger = logging.getLogger(__name__)


class Trainer:
    """Runs every stage of a `TrainConfig` into `output_dir`, resuming from its last checkpoint if any."""

    def __init__(
        self, config: TrainConfig, output_dir: str | Path, *, accelerator: Accelerator | None = None
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.train.mixed_precision,
            gradient_accumulation_steps=config.train.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        check_distribution(self.accelerator.distributed_type)  # FSDP, DeepSpeed: refused
        self.stage_steps = config.stage_steps()
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.manifest: list[dict] = []

    # ------------------------------------------------------------------ setup
    def _initial_model(self) -> tuple[GroundedLlavaForConditionalGeneration, int, Path | None]:
        """The model to continue from, the stage index to start at, and the checkpoint to resume."""
        resumed = resume_checkpoint(self.checkpoints_dir, cleanup=self.accelerator.is_main_process)
        self.accelerator.wait_for_everyone()
        if resumed is not None:
            latest, model, state = resumed
            manifest_file = self.output_dir / MANIFEST
            self.manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else []
            return model, int(state["extra"]["stage_index"]), latest
        if self.config.init_from:
            source = self.config.resolve(self.config.init_from)
            model = GroundedLlavaForConditionalGeneration.from_pretrained(source, is_trainable=True)
            inherited = source / MANIFEST
            self.manifest = json.loads(inherited.read_text()) if inherited.is_file() else []
            return model, 0, None
        set_seed(self.config.train.seed)
        return GroundedLlavaForConditionalGeneration.from_config(self.config.model), 0, None

    def _stage_start_dir(self, index: int) -> Path | None:
        if index > 0:
            return self.output_dir / "stages" / self.config.stages[index - 1].name
        return self.config.resolve(self.config.init_from) if self.config.init_from else None

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        model, start_index, resume_from = self._initial_model()
        for index in range(start_index, len(self.config.stages)):
            model = self._run_stage(index, model, resume_from)
            resume_from = None
        write_replica_digest(model, self.output_dir / "replicas", self.accelerator.process_index)
        final = self.output_dir / "final"
        if self.accelerator.is_main_process:
            model.save_pretrained(final)
            (final / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        self.accelerator.wait_for_everyone()
        return final

    def _run_stage(
        self, index: int, model: GroundedLlavaForConditionalGeneration, resume_from: Path | None
    ) -> GroundedLlavaForConditionalGeneration:
        stage, accelerator, loop = self.config.stages[index], self.accelerator, self.config.train
        # an end-of-stage checkpoint's RNG state is restored before the setup draws (new class rows)
        mid_stage = resume_from is not None and restore_before_setup(resume_from, accelerator.process_index)
        data = load_stage_data(
            self.config, index, model.config.heads.categories, model.config.num_bins,
            output_dir=self.output_dir, manifest=self.manifest, accelerator=self.accelerator,
        )  # fmt: skip
        if stage.kind == "chooser":
            return self._run_chooser_stage(index, model, data)
        distiller = self._distiller(index, model, resume_from)
        if data.new_categories:
            model.add_categories(data.new_categories)
        trainable = set_trainable(
            model, stage.kind, train_vision=stage.train_vision, train_detector=stage.train_detector,
            train_llm=stage.train_llm,
        )  # fmt: skip
        model.to(accelerator.device)

        datasets, sampler, loader = self._data_pipeline(index, model, data)
        parameters = [p for p in model.parameters() if p.requires_grad]
        groups = parameter_groups(model, stage.lr, stage.vision_lr_scale)
        optimizer = adamw(groups, lr=stage.lr, weight_decay=loop.weight_decay)
        steps = self.stage_steps[index]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, loop.warmup_ratio))
        stage_step = 0
        if mid_stage:
            stage_step = restore_after_setup(
                resume_from, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                process_index=accelerator.process_index,
            )  # fmt: skip
        # The scheduler stays unprepared: accelerate would step it once per process per call.
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        logger = MetricsLogger(
            self.output_dir / "metrics.jsonl",
            is_main_process=accelerator.is_main_process,
            resume_step=self._global_step(index, stage_step) if resume_from is not None else None,
        )
        progress = tqdm(
            total=steps,
            initial=stage_step,
            desc=f"stage {stage.name}",
            disable=not accelerator.is_main_process,
        )
        batches = endless_batches(loader, sampler)
        running: dict[str, list[float]] = {}
        guard = NonFiniteGuard(loop.max_nonfinite_steps, accelerator)
        started, samples_seen = time.perf_counter(), 0
        wrapped.train()
        while stage_step < steps:
            step_losses, finite = [], True
            for _ in range(loop.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(wrapped):
                    total, losses = self._losses(wrapped, model, batch, stage, distiller)
                    accelerator.backward(total)  # every rank, even on NaN: DDP's collectives stay in step
                    step_losses.append({"loss": total, **losses})
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(parameters, loop.max_grad_norm)
                        finite = guard.step_is_finite(v["loss"] for v in step_losses)
                        if not finite:  # AdamW leaves a parameter without a gradient untouched
                            optimizer.zero_grad(set_to_none=True)
                        optimizer.step()  # kept when skipping: an fp16 GradScaler must still update
                        scheduler.step()
                    optimizer.zero_grad()
                sampler.advance(stage.batch_size or loop.batch_size)
                samples_seen += (stage.batch_size or loop.batch_size) * accelerator.num_processes
            for key, value in (item for values in step_losses for item in values.items()):
                if finite and value is not None:  # a skipped step's losses are not averaged in
                    running.setdefault(key, []).append(float(value.detach()))
            stage_step += 1
            progress.update(1)
            global_step = self._global_step(index, stage_step)
            if stage_step % loop.log_every == 0 or stage_step == steps or guard.exhausted:
                # a window of skipped steps only has no loss: null in the log
                metrics = {"loss": math.nan} | {k: sum(v) / len(v) for k, v in running.items()}
                metrics["skipped_nonfinite"] = guard.take_window_count()
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["samples_per_s"] = samples_seen / (time.perf_counter() - started)
                logger.log(step=global_step, stage=stage.name, metrics=metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.1f}")
                running = {}
            if guard.exhausted:
                progress.close()  # before the error, which is then the last line on the terminal
            guard.stop_if_exhausted(stage=stage.name, step=global_step)
            if loop.eval_every and stage_step % loop.eval_every == 0 and stage_step < steps:
                logger.log(step=global_step, stage=stage.name, metrics=self.evaluate(model, datasets))
            if stage_step % loop.save_every == 0 and stage_step < steps:
                self._save_checkpoint(model, optimizer, scheduler, sampler, index, stage_step)
        progress.close()
        model = accelerator.unwrap_model(wrapped)
        if stage.kind == "base":  # the base rows trained: the adapter's token rows start from them (E13)
            sync_trainable_rows(model.llava)
        final_metrics = self.evaluate(model, datasets)
        logger.log(step=self._global_step(index, steps), stage=stage.name, metrics=final_metrics)
        logger.close()
        self._finish_stage(index, model, data, trainable, final_metrics)
        self._save_checkpoint(model, optimizer, scheduler, sampler, index + 1, 0)
        accelerator.free_memory()
        return model

    def _run_chooser_stage(
        self, index: int, model: GroundedLlavaForConditionalGeneration, data: StageData
    ) -> GroundedLlavaForConditionalGeneration:
        """A `chooser` stage (`chooser_stage.py`): cache the frozen model's `<box>` queries over the stage's
        steps, then train a fresh choice pointer on them. Under DDP every rank caches its shard and rank
        0's chooser is broadcast, so that the replicas stay identical."""
        stage, steps, device = self.config.stages[index], self.stage_steps[index], self.accelerator.device
        if data.new_categories:  # the heads would not know them
            raise ConfigError(
                f"stage {stage.name!r}: a chooser stage adds no categories: {data.new_categories}"
            )
        set_trainable(model, stage.kind)  # everything frozen while caching
        model.to(device)
        _, sampler, loader = self._data_pipeline(index, model, data)
        batches = itertools.islice(endless_batches(loader, sampler), steps)
        cache = cache_choice_queries(model, batches, device, total=steps, desc=f"stage {stage.name}: caching")
        chooser = model.add_chooser()
        trainable = set_trainable(model, stage.kind)
        optimizer = adamw(chooser.parameters(), lr=stage.lr, weight_decay=0.01)
        logger = MetricsLogger(self.output_dir / "metrics.jsonl", is_main_process=self.accelerator.is_main_process)  # fmt: skip
        metrics = train_chooser(
            chooser, cache, optimizer, epochs=stage.epochs, seed=self.config.train.seed + index,
            log=lambda epoch, m: logger.log(step=self._global_step(index, round(steps * epoch / stage.epochs)),
                                            stage=stage.name, metrics=m | {"cached_queries": len(cache)}),
        )  # fmt: skip
        logger.close()
        if self.accelerator.num_processes > 1:
            chooser.load_state_dict(broadcast(chooser.state_dict(), from_process=0))
        self._finish_stage(index, model, data, trainable, metrics | {"cached_queries": len(cache)})
        self._save_checkpoint(model, optimizer, None, sampler, index + 1, 0)
        return model

    def _distiller(
        self, index: int, model: GroundedLlavaForConditionalGeneration, resume_from: Path | None
    ) -> HeadDistiller | None:
        """The frozen stage-start snapshot of an increment stage (reloaded from disk on resume)."""
        stage = self.config.stages[index]
        if stage.kind not in ("increment", "heads") or stage.distill_weight <= 0:
            return None
        snapshot_dir = self._stage_start_dir(index)
        if snapshot_dir is None:
            raise ConfigError(f"stage {stage.name!r}: an increment stage needs an earlier stage or init_from")
        if resume_from is None:
            snapshot = model
        else:  # loading draws initial weights: the uninterrupted run did not
            with preserved_rng():
                snapshot = GroundedLlavaForConditionalGeneration.from_pretrained(snapshot_dir)
        return HeadDistiller(snapshot).to(self.accelerator.device)

    def _data_pipeline(
        self, index: int, model: GroundedLlavaForConditionalGeneration, data: StageData
    ) -> tuple[list[GroundedDataset], ResumableSampler, DataLoader]:
        """Datasets per source, the resumable rank-sharded mixing sampler and the loader over them."""
        stage, loop = self.config.stages[index], self.config.train
        datasets = [self._dataset(stage, model, s, seed=loop.seed + index) for s in data.sources]
        batch_size, ranks = stage.batch_size or loop.batch_size, self.accelerator.num_processes
        sampler = ResumableSampler(
            source_sizes=[len(d) for d in datasets], weights=data.weights, seed=loop.seed + index,
            num_replicas=ranks, rank=self.accelerator.process_index,
            source_block=batch_size * ranks if stage.source_batches else 1,
        )  # fmt: skip
        loader = DataLoader(
            ConcatDataset(datasets),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_heads if stage.kind == "heads" else GroundedCollator(model.processor),
            drop_last=True,
            generator=torch.Generator(),
        )
        return datasets, sampler, loader

    @staticmethod
    def _dataset(
        stage: StageConfig, model, source: LoadedSource, *, seed: int
    ) -> GroundedDataset | HeadsDataset:
        common = {
            "categories": model.config.heads.categories,
            "mask_resolution": model.mask_head.mask_resolution,
            "on_bad_data": source.on_bad_data,
        }
        if stage.kind == "heads":
            return HeadsDataset(
                source.samples,
                model.processor,
                hflip_prob=stage.hflip_prob,
                zoom_prob=stage.zoom_prob,
                seed=seed,
                attribute=model.config.heads.attribute,
                attribute_values=model.config.heads.attribute_values,
                **common,
            )
        return GroundedDataset(
            source.samples, model.processor, hflip_prob=stage.hflip_prob, seed=seed,
            scene_line=model.config.scene_line, attribute=model.config.heads.attribute,
            attribute_values=model.config.heads.attribute_values, **common,
        )  # fmt: skip

    def _losses(
        self, wrapped, model: GroundedLlavaForConditionalGeneration, batch: TrainingBatch | HeadsBatch,
        stage: StageConfig, distiller: HeadDistiller | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:  # fmt: skip
        """The stage's total loss: the model's (LM + det + mask + pointer) + KL on chat samples + old-class
        distillation. A heads stage runs the heads step alone (jittered true boxes as SAM prompts)."""
        device = self.accelerator.device
        if isinstance(batch, HeadsBatch):
            pixel_values = batch.pixel_values.to(device)
            prompts = batch.box_prompts(
                jitter=stage.mask_jitter, canvas_size=model.canvas_size, device=device
            )
            out = wrapped(
                pixel_values=pixel_values, det_targets=batch.det_targets.to(device), mask_prompts=prompts
            )
        else:
            # `base` trains the LLM (LoRA off: zero output, only cost); its pointer does not pull on it (E11)
            base = stage.kind == "base"
            with adapters_disabled(model.llava) if base else contextlib.nullcontext():
                out = wrapped(
                    **model_kwargs(batch, device, det_targets=stage.train_detector, pointer=not base)
                )
            pixel_values = batch.batch.pixel_values
        losses = {"lm_loss": out.lm_loss, "det_loss": out.det_loss, "mask_loss": out.mask_loss,
                  "pointer_loss": out.pointer_loss, "pointer_accuracy": out.pointer_accuracy,
                  "attribute_loss": out.attribute_loss, "attribute_accuracy": out.attribute_accuracy}  # fmt: skip
        total = out.loss if out.loss is not None else out.last_hidden_state.sum() * 0.0
        if stage.kl_weight > 0 and not isinstance(batch, HeadsBatch):
            losses["kl_loss"] = chat_kl_loss(model, batch.batch, out, batch.is_chat)
            total = total + stage.kl_weight * losses["kl_loss"]
        if distiller is not None and out.detections is not None:  # None: a chat batch did not run the heads
            pixels = None if pixel_values is None else pixel_values.to(device)
            losses["distill_loss"] = distiller.loss(out.image_features, pixels, out.detections)
            total = total + stage.distill_weight * losses["distill_loss"]
        # Nothing trainable was reached (a chat batch of a `train_llm: false` stage): a zero that backward takes.
        if not total.requires_grad:
            total = total + sum(p.view(-1)[0] for p in model.parameters() if p.requires_grad) * 0.0
        return total, losses

    def _global_step(self, index: int, stage_step: int) -> int:
        return sum(self.stage_steps[:index]) + stage_step

    def evaluate(self, model: GroundedLlavaForConditionalGeneration, datasets: list) -> dict:
        """The evaluation hook (`eval_hook.evaluation_losses`) on `train.eval_samples` samples."""
        loop = self.config.train
        return evaluation_losses(model, datasets, samples=loop.eval_samples, batch_size=loop.batch_size,
                                 device=self.accelerator.device)  # fmt: skip

    def _save_checkpoint(
        self, model, optimizer, scheduler, sampler, stage_index: int, stage_step: int
    ) -> None:
        step = self._global_step(stage_index, stage_step)
        where = self.checkpoints_dir / checkpoint_name(step)
        check_finite(trainable_state_dict(model), where=str(where), what="model")  # weights: once, in model/
        save_training_state(
            self.checkpoints_dir,
            step=step,
            model_state=None,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler_state=sampler.state_dict(),
            extra={"stage_index": stage_index, "stage_step": stage_step},
            keep_last=self.config.train.keep_last,
            write_files=lambda directory: model.save_pretrained(directory / "model"),
            accelerator=self.accelerator,
        )

    def _finish_stage(self, index: int, model, data: StageData, trainable: dict, metrics: dict) -> None:
        stage: StageConfig = self.config.stages[index]
        stage_dir = self.output_dir / "stages" / stage.name
        check_finite(trainable_state_dict(model), where=str(stage_dir), what="model")
        entry = {
            "name": stage.name,
            "kind": stage.kind,
            "steps": self.stage_steps[index],
            "trainable_parameters": trainable,
            "data": [s.description for s in data.sources],
            "sources": [absolute_source(s, self.config, self.output_dir) for s in stage.data],
            "new_categories": data.new_categories,
            "categories": list(model.config.heads.categories),
            "metrics": {k: finite_or_none(v) for k, v in metrics.items()},  # strict JSON: NaN as null
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.manifest = [e for e in self.manifest if e["name"] != stage.name] + [entry]
        if self.accelerator.is_main_process:
            model.save_pretrained(stage_dir)
            (stage_dir / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
            (self.output_dir / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
            plot_loss_curves(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curves.png")
        self.accelerator.wait_for_everyone()
