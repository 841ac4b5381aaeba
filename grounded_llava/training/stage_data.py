"""A stage's training data: its sources, the replay buffer of earlier stages, the categories it adds."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from ..config_io import from_dict, to_dict
from ..data.sample import GroundedSample
from .config import SourceConfig, TrainConfig
from .data_sources import LoadedSource, load_source, replay_policy, synthetic_dir
from .heads_data import load_heads_sources

logger = logging.getLogger(__name__)


@dataclass
class StageData:
    """The sources of one stage (replay buffer last), their mixing weights, the categories new to the head.
    A heads stage's sources hold `ImageRecord`s (whole images), the others' `GroundedSample`s."""

    sources: list[LoadedSource]
    weights: list[float]
    new_categories: list[str]


def load_stage_data(
    config: TrainConfig,
    index: int,
    known_categories: list[str],
    num_bins: int,
    *,
    output_dir: Path,
    manifest: list[dict],
    accelerator: Accelerator,
) -> StageData:
    """Read stage `index`'s sources (rank 0 first: it generates synthetic worlds) and its replay buffer."""
    stage = config.stages[index]
    if stage.kind == "heads":
        with accelerator.main_process_first():
            earlier = [s for st in config.stages[:index] for s in st.data]
            earlier += _inherited_sources(config, manifest, output_dir)
            sources, weights = load_heads_sources(config, index, output_dir=output_dir, earlier=earlier)
        return StageData(
            sources=sources, weights=weights, new_categories=_new_categories(sources, known_categories)
        )
    with accelerator.main_process_first():
        sources = [
            load_source(s, config=config, output_dir=output_dir, num_bins=num_bins) for s in stage.data
        ]
        weights = [s.weight for s in stage.data]
        if stage.replay_weight > 0:
            replay = replay_buffer(config, index, num_bins, output_dir=output_dir, manifest=manifest)
            if replay.samples:
                sources.append(replay)
                weights.append(stage.replay_weight)
    return StageData(
        sources=sources, weights=weights, new_categories=_new_categories(sources, known_categories)
    )


def _new_categories(sources: list[LoadedSource], known: list[str]) -> list[str]:
    new: list[str] = []
    for source in sources:
        new += [c for c in source.categories if c not in known and c not in new]
    return new


def _inherited_sources(config: TrainConfig, manifest: list[dict], output_dir: Path) -> list[SourceConfig]:
    """Sources of the stages of the run this one was initialised from, as recorded in its manifest."""
    names = {s.name for s in config.stages}
    sources = []
    for entry in manifest:
        if entry["name"] in names:
            continue
        for source in (from_dict(SourceConfig, s) for s in entry.get("sources", [])):
            location = source.dir or source.annotations
            if source.dir is not None and not Path(source.dir).exists():
                # A synthetic world is a pure function of its parameters: regenerate it here.
                source.dir = str(output_dir / "replay" / entry["name"] / Path(source.dir).name)
                sources.append(source)
            elif Path(location).exists():
                sources.append(source)
            else:
                logger.warning(
                    "replay: %s of stage %s is not on this machine; skipped", location, entry["name"]
                )
    return sources


def replay_buffer(
    config: TrainConfig, index: int, num_bins: int, *, output_dir: Path, manifest: list[dict]
) -> LoadedSource:
    """`replay_size` grounding samples drawn (deterministically) from every earlier stage's grounding data:
    the earlier stages of this config and those of the run it was initialised from (its manifest)."""
    stage = config.stages[index]
    earlier = [source for s in config.stages[:index] for source in s.data]
    earlier += _inherited_sources(config, manifest, output_dir)
    pool: list[GroundedSample] = []
    grounding = [source for source in earlier if source.is_grounding]
    for source in grounding:
        pool += load_source(source, config=config, output_dir=output_dir, num_bins=num_bins).samples
    rng = random.Random(f"replay-{config.train.seed}-{stage.name}")
    chosen = rng.sample(pool, min(stage.replay_size, len(pool))) if pool else []
    description = {"kind": "replay", "samples": len(chosen), "weight": stage.replay_weight}
    return LoadedSource(chosen, [], description, on_bad_data=replay_policy(grounding))


def absolute_source(source: SourceConfig, config: TrainConfig, output_dir: Path) -> dict:
    """The source with absolute paths, so that a later run can replay it from the manifest."""
    entry = to_dict(source)
    if source.dir is not None:
        entry["dir"] = str(synthetic_dir(source, config, output_dir).resolve())
    for key in ("annotations", "images"):
        if entry[key] is not None:
            entry[key] = str(config.resolve(entry[key]).resolve())
    return entry
