"""Data sources -> `GroundedSample`s: COCO instances, grounded tasks, chat JSON, the synthetic shapes world.

The synthetic world's names load lazily, so `python -m grounded_llava.data.synthetic` runs its module once.
"""

from importlib import import_module

from grounded_llava.data.bad_data import BadDataReport, DataError
from grounded_llava.data.chat import load_coco_captions, load_llava_chat
from grounded_llava.data.coco import CocoInstances, ImageRecord, InstanceRecord, load_coco_instances
from grounded_llava.data.phrasing import flip_text_left_right
from grounded_llava.data.tasks import (
    TASK_NAMES,
    TaskConfig,
    build_task_samples,
    make_task_sample,
    sample_image_task,
)

__all__ = [
    "SHAPES",
    "SHAPE_IDS",
    "TASK_NAMES",
    "BadDataReport",
    "CocoInstances",
    "DataError",
    "ImageRecord",
    "InstanceRecord",
    "TaskConfig",
    "build_task_samples",
    "flip_text_left_right",
    "generate_world",
    "load_coco_captions",
    "load_coco_instances",
    "load_llava_chat",
    "make_task_sample",
    "sample_image_task",
]


_SYNTHETIC = ("SHAPES", "SHAPE_IDS", "generate_world")


def __getattr__(name: str):
    if name in _SYNTHETIC:
        return getattr(import_module("grounded_llava.data.synthetic"), name)
    raise AttributeError(f"module 'grounded_llava.data' has no attribute {name!r}")
