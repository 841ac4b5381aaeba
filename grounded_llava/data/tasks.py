"""Grounded conversations from COCO-style records: detect, find, segment, count, exists, refer, region_caption,
refer_all, chat.

Every sample is one human/gpt exchange about one image (`<image>\\n` opens the human turn), except
`refer_all`: one turn per referring expression of the image (up to `TaskConfig.max_turns`), for a stage
that reads many `<box>` queries per image pass (the `chooser` stage), and `chat`: the synthetic world's
plain chat (counts, colours, positions; `synthetic_language.chat_turns`) drawn anew from the instances'
attributes with subjects balanced by `absent_prob` (images without the synthetic attributes give none).
Every sample comes with:
- `det_boxes`/`det_categories`: EVERY non-crowd instance of the image (`has_det_targets=True`), so
  the detection head is supervised on the full image whatever the question was;
- `seg_masks`: one bool (H, W) mask per `<seg>` token of the gpt turn, in token order.

Rules: crowd annotations are never a target (and a category with a crowd region in the image is
never counted, found or segmented there, since its instance list is not exhaustive); an answer
carries at most `TaskConfig.max_boxes` boxes (the largest ones, written left to right; `count`
still says the true number); an instance without segmentation gets a box but no `<seg>`.
Randomness only comes from the `random.Random` passed in: same seed, same samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from grounded_llava.codec import DEFAULT_NUM_BINS, P_CLOSE, P_OPEN, SEG, encode_box, encode_phrase
from grounded_llava.config_io import ConfigError
from grounded_llava.conversation import conversation as make_conversation
from grounded_llava.data import phrasing as en
from grounded_llava.data.coco import CocoInstances, ImageRecord, InstanceRecord
from grounded_llava.data.sample import GroundedSample
from grounded_llava.data.shape_words import COLORS
from grounded_llava.data.synthetic_language import SceneObject, chat_turns

TASK_NAMES = ("detect", "find", "segment", "count", "exists", "refer", "region_caption", "refer_all", "chat")
DEFAULT_TASK_WEIGHTS = {
    "detect": 2.0,
    "find": 2.0,
    "segment": 1.0,
    "count": 1.0,
    "exists": 1.0,
    "refer": 2.0,
    "region_caption": 1.0,
}


@dataclass
class TaskConfig:
    """How grounded samples are made.

    Attributes:
        weights: task name -> relative frequency (0 disables a task); unknown names are an error.
        num_bins: number of `<loc_k>` bins (must match the tokenizer's grounding tokens).
        max_boxes: most boxes in one answer.
        refer_seg: put `<seg>` after the referred box when the instance has a mask.
        absent_prob: how often `count`/`exists` (and `chat`'s counts) ask about a category absent from the
            image.
        max_turns: most turns of a `refer_all` or `chat` conversation.
        chat_draws: a `chat` conversation joins this many draws of `chat_turns` (2-4 turns each, repeated
            questions dropped): more questions per image pass.
        chat_grounded: `chat` answers ground the objects their colour and position answers name.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    num_bins: int = DEFAULT_NUM_BINS
    max_boxes: int = 20
    refer_seg: bool = True
    absent_prob: float = 0.3
    max_turns: int = 32
    chat_draws: int = 1
    chat_grounded: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TASK_NAMES)
        if unknown:
            raise ConfigError(f"unknown task names {sorted(unknown)} in weights; known: {TASK_NAMES}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ConfigError(f"task weights must be >= 0 with at least one > 0, got {self.weights}")
        if (
            self.num_bins < 2
            or self.max_boxes < 1
            or self.max_turns < 1
            or self.chat_draws < 1
            or not 0.0 <= self.absent_prob <= 1.0
        ):
            raise ConfigError(
                f"need num_bins >= 2, max_boxes >= 1, max_turns >= 1, chat_draws >= 1, 0 <= absent_prob <= 1; "
                f"got {self.num_bins}, {self.max_boxes}, {self.max_turns}, {self.chat_draws}, {self.absent_prob}"
            )


@dataclass
class _Scene:
    """What the task builders need to know about one image."""

    record: ImageRecord
    category_names: Sequence[str]
    rng: random.Random
    config: TaskConfig
    by_category: dict[str, list[InstanceRecord]]  # non-crowd instances per category, category-list order
    clean: list[str]  # categories with instances and no crowd region: their instance list is exhaustive
    absent: list[str]  # categories not in the image at all

    @classmethod
    def of(
        cls, record: ImageRecord, category_names: Sequence[str], rng: random.Random, config: TaskConfig
    ) -> _Scene:
        present = {inst.category_name for inst in record.instances}
        crowded = {inst.category_name for inst in record.instances if inst.iscrowd}
        by_category: dict[str, list[InstanceRecord]] = {}
        for name in category_names:
            instances = [i for i in record.non_crowd() if i.category_name == name]
            if instances:
                by_category[name] = instances
        clean = [name for name in by_category if name not in crowded]
        absent = [name for name in category_names if name not in present]
        return cls(record, category_names, rng, config, by_category, clean, absent)

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(list(options))

    def capped(self, instances: Sequence[InstanceRecord]) -> list[InstanceRecord]:
        """At most `max_boxes` instances (largest first), then left to right."""
        largest = sorted(instances, key=lambda i: -_area(i.box_xyxy))[: self.config.max_boxes]
        return sorted(largest, key=lambda i: (i.box_xyxy[0], i.box_xyxy[1]))

    def grounded(self, phrase: str, instances: Sequence[InstanceRecord], *, seg: bool = False) -> str:
        """`<p>phrase</p>` + a box group per instance (+ `<seg>` after those with a mask when `seg`)."""
        if not seg:
            boxes = [i.box_xyxy for i in instances]
            return encode_phrase(phrase, boxes, self.record.image_size, num_bins=self.config.num_bins)
        groups = [
            encode_box(i.box_xyxy, self.record.image_size, self.config.num_bins) + (SEG if i.has_mask else "")
            for i in instances
        ]
        return P_OPEN + phrase + P_CLOSE + "".join(groups)

    def masks(self, instances: Sequence[InstanceRecord]) -> list[np.ndarray]:
        return [i.decode_mask(self.record.image_size) for i in instances if i.has_mask]

    def sample(
        self, task: str, question: str, answer: str, masks: list[np.ndarray] | None = None
    ) -> GroundedSample:
        return self.conversation(task, [(question, answer)], masks)

    def conversation(
        self, task: str, turns: Sequence[tuple[str, str]], masks: list[np.ndarray] | None = None
    ) -> GroundedSample:
        """A sample of (question, answer) turns about the image (`<image>` opens the first question)."""
        instances = self.record.non_crowd()
        boxes = np.array([i.box_xyxy for i in instances], dtype=np.float32).reshape(-1, 4)
        conversation = make_conversation(turns)
        return GroundedSample(
            image_path=self.record.path,
            conversation=conversation,
            image_size=self.record.image_size,
            has_det_targets=True,
            det_boxes=boxes,
            det_categories=[i.category_name for i in instances],
            det_attributes=[i.attributes for i in instances],
            seg_masks=masks or [],
            source=self.record.file_name,
            task=task,
        )


def _area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _name_for(name: str, count: int) -> str:
    return name if count == 1 else en.pluralize(name)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _detect(s: _Scene) -> GroundedSample | None:
    question = s.pick(en.QUESTIONS["detect"])
    kept = {id(i) for i in s.capped(s.record.non_crowd())}
    parts = []
    for name, instances in s.by_category.items():
        chosen = s.capped([i for i in instances if id(i) in kept])
        if chosen:
            parts.append(s.grounded(_name_for(name, len(chosen)), chosen))
    if not parts:
        return s.sample("detect", question, s.pick(en.DETECT_EMPTY))
    return s.sample("detect", question, s.pick(en.DETECT_ANSWERS).format(g=_join(parts)))


def _find(s: _Scene) -> GroundedSample | None:
    if not s.clean:
        return None
    name = s.pick(s.clean)
    chosen = s.capped(s.by_category[name])
    question = s.pick(en.QUESTIONS["find"]).format(name=name, names=en.pluralize(name))
    answer = s.pick(en.FIND_ANSWERS).format(g=s.grounded(_name_for(name, len(chosen)), chosen))
    return s.sample("find", question, answer)


def _segment(s: _Scene) -> GroundedSample | None:
    names = [n for n in s.clean if any(i.has_mask for i in s.by_category[n])]
    if not names:
        return None
    name = s.pick(names)
    chosen = s.capped(s.by_category[name])
    question = s.pick(en.QUESTIONS["segment"]).format(name=name, names=en.pluralize(name))
    answer = s.pick(en.FIND_ANSWERS).format(g=s.grounded(_name_for(name, len(chosen)), chosen, seg=True))
    return s.sample("segment", question, answer, s.masks(chosen))


def _ask_absent(s: _Scene) -> bool:
    return bool(s.absent) and (not s.clean or s.rng.random() < s.config.absent_prob)


def _count(s: _Scene) -> GroundedSample | None:
    if not s.clean and not s.absent:
        return None
    if _ask_absent(s):
        name = s.pick(s.absent)
        question = s.pick(en.QUESTIONS["count"]).format(names=en.pluralize(name))
        return s.sample("count", question, s.pick(en.COUNT_NONE).format(names=en.pluralize(name)))
    name = s.pick(s.clean)
    instances = s.by_category[name]
    grounded = s.grounded(_name_for(name, len(instances)), s.capped(instances))
    templates = en.COUNT_ONE if len(instances) == 1 else en.COUNT_MANY
    question = s.pick(en.QUESTIONS["count"]).format(names=en.pluralize(name))
    return s.sample("count", question, s.pick(templates).format(n=len(instances), g=grounded))


def _exists(s: _Scene) -> GroundedSample | None:
    if not s.clean and not s.absent:
        return None
    if _ask_absent(s):
        name = s.pick(s.absent)
        question = s.pick(en.QUESTIONS["exists"]).format(a_name=en.with_article(name))
        answer = s.pick(en.EXISTS_NO).format(name=name, names=en.pluralize(name))
        return s.sample("exists", question, answer)
    name = s.pick(s.clean)
    instances = s.by_category[name]
    question = s.pick(en.QUESTIONS["exists"]).format(a_name=en.with_article(name))
    grounded = s.grounded(_name_for(name, len(instances)), s.capped(instances))
    if len(instances) == 1:
        answer = s.pick(en.EXISTS_YES).format(g=en.with_article(name).split(" ")[0] + " " + grounded)
    else:
        answer = f"Yes, there are {len(instances)} {grounded}."
    return s.sample("exists", question, answer)


def _refer(s: _Scene) -> GroundedSample | None:
    candidates = [i for i in s.record.non_crowd() if i.referring_expressions]
    if not candidates:
        return None
    instance = s.rng.choice(candidates)
    expression = s.pick(instance.referring_expressions)
    seg = s.config.refer_seg and instance.has_mask
    question = s.pick(en.QUESTIONS["refer"]).format(expr=expression)
    answer = s.pick(en.REFER_ANSWERS).format(g=s.grounded(expression, [instance], seg=seg))
    return s.sample("refer", question, answer, s.masks([instance]) if seg else None)


def _refer_all(s: _Scene) -> GroundedSample | None:
    """Every (instance, referring expression) pair of the image, one refer turn each, in random order (at
    most `max_turns`; no `<seg>`): one image pass yields a `<box>` query per expression."""
    pairs = [(i, e) for i in s.record.non_crowd() for e in i.referring_expressions]
    if not pairs:
        return None
    pairs = s.rng.sample(pairs, min(len(pairs), s.config.max_turns))
    turns = [
        (
            s.pick(en.QUESTIONS["refer"]).format(expr=expression),
            s.pick(en.REFER_ANSWERS).format(g=s.grounded(expression, [instance])),
        )
        for instance, expression in pairs
    ]
    return s.conversation("refer_all", turns)


def _chat(s: _Scene) -> GroundedSample | None:
    """Plain chat turns about the scene, drawn from the instances' synthetic attributes (None without them)."""
    instances = s.record.non_crowd()
    if not instances or any({"shape", "color", "size"} - set(i.attributes) for i in instances):
        return None
    objects = [
        SceneObject(shape=i.attributes["shape"], color=i.attributes["color"], size=i.attributes["size"],
                    box_xyxy=tuple(i.box_xyxy), area=int(i.area))
        for i in instances
    ]  # fmt: skip
    instance_of = {id(o): i for o, i in zip(objects, instances, strict=True)}
    ground = (
        (lambda words, obj: s.grounded(words, [instance_of[id(obj)]])) if s.config.chat_grounded else None
    )
    turns: dict[str, str] = {}
    for _ in range(s.config.chat_draws):
        drawn = chat_turns(objects, background=s.record.attributes.get("background"), shapes=s.category_names,
                           colors=COLORS, rng=s.rng, absent_prob=s.config.absent_prob, ground=ground)  # fmt: skip
        turns |= {q: a for q, a in drawn if q not in turns}
    return s.conversation("chat", list(turns.items())[: s.config.max_turns])


def _describe(instance: InstanceRecord, rng: random.Random) -> str:
    """`red circle`, `small red circle` (synthetic attributes) or the category name."""
    words = [instance.attributes["size"]] if "size" in instance.attributes and rng.random() < 0.5 else []
    words += [instance.attributes["color"]] if "color" in instance.attributes else []
    return " ".join([*words, instance.category_name])


def _region_caption(s: _Scene) -> GroundedSample | None:
    instances = s.record.non_crowd()
    if not instances:
        return None
    instance = s.rng.choice(instances)
    box = encode_box(instance.box_xyxy, s.record.image_size, s.config.num_bins)
    question = s.pick(en.QUESTIONS["region_caption"]).format(box=box)
    description = en.with_article(_describe(instance, s.rng))
    answer = s.pick(en.REGION_ANSWERS).format(a_desc=description, A_desc=en.capitalize_first(description))
    return s.sample("region_caption", question, answer)


_BUILDERS: dict[str, Callable[[_Scene], GroundedSample | None]] = {
    "detect": _detect,
    "find": _find,
    "segment": _segment,
    "count": _count,
    "exists": _exists,
    "refer": _refer,
    "region_caption": _region_caption,
    "refer_all": _refer_all,
    "chat": _chat,
}


def make_task_sample(
    record: ImageRecord,
    *,
    task: str,
    category_names: Sequence[str],
    rng: random.Random,
    config: TaskConfig,
) -> GroundedSample | None:
    """One sample of `task` about `record`, or None when the image cannot support it (e.g. no referring
    expressions for `refer`). `category_names` is the dataset's full category list (absent ones are
    what `exists`/`count` may ask about)."""
    if task not in _BUILDERS:
        raise ConfigError(f"unknown task {task!r}; known: {TASK_NAMES}")
    return _BUILDERS[task](_Scene.of(record, category_names, rng, config))


def sample_image_task(
    record: ImageRecord, *, category_names: Sequence[str], rng: random.Random, config: TaskConfig
) -> GroundedSample | None:
    """Draw a task by `config.weights` among those the image supports; None when it supports none."""
    remaining = {t: w for t, w in config.weights.items() if w > 0}
    while remaining:
        task = rng.choices(list(remaining), weights=list(remaining.values()))[0]
        sample = make_task_sample(record, task=task, category_names=category_names, rng=rng, config=config)
        if sample is not None:
            return sample
        del remaining[task]
    return None


def build_task_samples(
    dataset: CocoInstances, *, config: TaskConfig, seed: int, samples_per_image: int = 1
) -> list[GroundedSample]:
    """`samples_per_image` task samples per image; image k's draw j uses `Random(f"{seed}/{image_id}/{j}")`,
    so a sample does not depend on the other images (reordering or subsetting the set keeps it)."""
    samples = []
    for record in dataset.images:
        for draw in range(samples_per_image):
            rng = random.Random(f"{seed}/{record.image_id}/{draw}")
            sample = sample_image_task(record, category_names=dataset.category_names, rng=rng, config=config)
            if sample is not None:
                sample.source = f"{dataset.source}:{record.file_name}"
                samples.append(sample)
    return samples
