"""A stage's data sources (`SourceConfig`) -> lists of `GroundedSample`s, generating the synthetic world if needed."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..config_io import ConfigError
from ..data import (
    TaskConfig,
    build_task_samples,
    generate_world,
    load_coco_captions,
    load_coco_instances,
    load_llava_chat,
)
from ..data.bad_data import BadDataPolicy, DataError
from ..data.coco import CocoInstances, ImageRecord
from ..data.sample import GroundedSample
from .config import SourceConfig, TrainConfig

logger = logging.getLogger(__name__)
_WORLD_PARAMS = "world_params.json"


@dataclass
class LoadedSource:
    """The samples of one source, its category names (grounding sources) and a description for the manifest.
    `samples` are `GroundedSample`s, or `ImageRecord`s for a heads stage (`heads_data.py`);
    `on_bad_data` is the source's policy, also for images found unreadable during training."""

    samples: list[GroundedSample] | list[ImageRecord]
    categories: list[str]
    description: dict
    on_bad_data: BadDataPolicy = "strict"


def replay_policy(sources: list[SourceConfig]) -> BadDataPolicy:
    """The replay buffer's `on_bad_data`: `skip` when any source it draws from skips bad data."""
    return "skip" if any(source.on_bad_data == "skip" for source in sources) else "strict"


def synthetic_dir(source: SourceConfig, config: TrainConfig, output_dir: Path) -> Path:
    path = Path(source.dir).expanduser()
    return path if path.is_absolute() else output_dir / path


def ensure_synthetic_world(source: SourceConfig, directory: Path) -> None:
    """Generate the world into `directory` unless it holds one made with the same parameters."""
    params = {
        "num_images": source.num_images,
        "seed": source.seed,
        "image_size": source.image_size,
        "categories": source.categories,
    }
    marker = directory / _WORLD_PARAMS
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing != params:
            raise ConfigError(f"{directory} holds a synthetic world made with {existing}, not {params}")
        return
    logger.info("generating the synthetic world %s into %s", params, directory)
    generate_world(
        directory,
        num_images=source.num_images,
        seed=source.seed,
        image_size=source.image_size,
        categories=source.categories,
    )
    marker.write_text(json.dumps(params))


def load_instances(annotations: Path, images: Path, *, on_bad_data: BadDataPolicy) -> CocoInstances:
    """`load_coco_instances` (header checks) of a source, read once per process: every stage and source that
    trains on the same world shares it (a 2000-image world takes ~3 s to read and validate, and the tiny
    preset reads its worlds ten times). Keyed by the paths and the annotation file's size and mtime, so
    an annotation file that changes on disk is read again. Callers must not modify what it returns."""
    stat = Path(annotations).stat()
    key = (str(Path(annotations).resolve()), str(Path(images).resolve()), on_bad_data)
    return _read_instances(*key, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_instances(
    annotations: str, images: str, on_bad_data: BadDataPolicy, size: int, mtime_ns: int
) -> CocoInstances:
    return load_coco_instances(Path(annotations), Path(images), on_bad_data=on_bad_data, image_check="header")


def load_source(
    source: SourceConfig, *, config: TrainConfig, output_dir: Path, num_bins: int
) -> LoadedSource:
    """Read one source; grounding sources become task samples deterministic by `source.seed`."""
    if source.kind in ("synthetic", "synthetic_chat"):
        directory = synthetic_dir(source, config, output_dir)
        ensure_synthetic_world(source, directory)
        annotations, images = directory / "annotations.json", directory / "images"
        chat_file = directory / "chat.json"
    else:
        annotations, images = config.resolve(source.annotations), config.resolve(source.images)
        chat_file = annotations
    categories: list[str] = []
    if source.is_grounding:
        dataset = load_instances(annotations, images, on_bad_data=source.on_bad_data)
        task_config = TaskConfig(
            num_bins=num_bins,
            chat_draws=source.chat_draws,
            chat_grounded=source.chat_grounded,
            absent_prob=source.absent_prob,
            **({"weights": source.tasks} if source.tasks else {}),
        )
        samples = build_task_samples(
            dataset, config=task_config, seed=source.seed, samples_per_image=source.samples_per_image
        )
        present = {c for s in samples for c in s.det_categories}
        categories = [c for c in dataset.category_names if c in present]
    elif source.kind == "coco_captions":
        samples, _ = load_coco_captions(chat_file, images, on_bad_data=source.on_bad_data)
    else:
        samples, _ = load_llava_chat(chat_file, images, on_bad_data=source.on_bad_data, num_bins=num_bins)
    if source.limit is not None:
        samples = samples[: source.limit]
    if not samples:
        raise DataError(f"data source {source.kind} ({annotations}) produced no samples")
    description = {
        "kind": source.kind,
        "path": str(annotations),
        "samples": len(samples),
        "weight": source.weight,
    }
    return LoadedSource(
        samples=samples, categories=categories, description=description, on_bad_data=source.on_bad_data
    )
