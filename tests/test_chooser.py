"""The choice pointer (docs/EXPERIMENTS.md E21): `pointer_decision`, its offline training on cached
queries, and a `chooser` stage run by the Trainer from the shipped checkpoint."""

import math

import pytest
import torch

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.config_io import from_dict
from grounded_llava.inference.checkpoint_paths import DEFAULT_CHECKPOINT
from grounded_llava.modeling.pointer import ProposalPointer, pointer_decision
from grounded_llava.training.chooser_stage import ChoiceCache, choice_logits, train_chooser
from grounded_llava.training.config import TrainConfig
from grounded_llava.training.metrics_log import read_metrics
from grounded_llava.training.trainer import Trainer

INF = float("inf")


def test_pointer_decision_takes_none_from_the_stop_pointer_and_the_proposal_from_the_chooser():
    stop = torch.tensor(
        [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [1.0, 0.0, -INF, 0.0], [-INF, -INF, -INF, 0.0]]
    )
    choice = torch.tensor(
        [[0.0, 0.0, 5.0, 9.0], [4.0, 0.0, 0.0, 0.0], [0.0, 2.0, -INF, 0.0], [-INF, -INF, -INF, 0.0]]
    )
    best, probability = pointer_decision(stop)
    assert best.tolist() == [0, 3, 0, 3]
    best, probability = pointer_decision(stop, choice)
    # row 0: the stop pointer says a proposal, the chooser picks proposal 2 (its own "none", 9, is ignored)
    # row 1: "none" from the stop pointer; row 2: a blocked proposal stays blocked; row 3: nothing to choose
    assert best.tolist() == [2, 3, 1, 3]
    p_none = stop.softmax(-1)[:, 3]
    p_choice = choice[:, :3].softmax(-1)
    expected = [(1 - p_none[0]) * p_choice[0, 2], p_none[1], (1 - p_none[2]) * p_choice[2, 1], 1.0]
    assert probability.tolist() == pytest.approx([float(e) for e in expected], rel=1e-6)


def _planted_cache(count: int, k: int, generator: torch.Generator) -> ChoiceCache:
    """Queries that name their target by its pooled features through a fixed random map (as a colour word
    names a region's colour), three per image; some proposals blocked (padding, or taken by an earlier box)."""
    pool_dim, text, images = 2 * 2 * 6, 8, (count + 2) // 3
    pooled = torch.randn(images, k, pool_dim, generator=generator)
    image = torch.arange(count) // 3
    target = torch.randint(0, k, (count,), generator=generator)
    words = torch.randn(pool_dim, 2 * text, generator=generator)
    queries = pooled[image, target] @ words
    blocked = torch.rand(count, k, generator=generator) < 0.2
    blocked[torch.arange(count), target] = False
    positives = torch.zeros(count, k, dtype=torch.bool)
    positives[torch.arange(count), target] = True
    geometry = torch.rand(images, k, 9, generator=generator)
    return ChoiceCache(queries, image, pooled, geometry, blocked, positives)


def test_a_concatenated_cache_keeps_each_query_with_its_own_images_regions():
    torch.manual_seed(0)
    chooser = ProposalPointer(
        channels=6, text_hidden_size=16, canvas_size=112, stride=8.0, dim=32, pool=2, reads="words"
    ).eval()
    first, second = (_planted_cache(n, 5, torch.Generator().manual_seed(n)) for n in (7, 11))
    joined = ChoiceCache.concat([first, second])
    assert len(joined) == 18 and len(joined.pooled) == len(first.pooled) + len(second.pooled)
    with torch.no_grad():
        expected = torch.cat([choice_logits(chooser, first), choice_logits(chooser, second)])
        assert torch.allclose(choice_logits(chooser, joined), expected, atol=1e-5)
        picked = torch.tensor([17, 0, 9, 3])  # rows() keeps only the images these use, re-indexed
        part = joined.rows(picked)
        assert len(part.pooled) == 4 and torch.allclose(
            choice_logits(chooser, part), expected[picked], atol=1e-5
        )


def test_the_chooser_learns_a_planted_choice_and_never_picks_a_blocked_proposal():
    generator = torch.Generator().manual_seed(0)
    cache = _planted_cache(1200, 6, generator)
    torch.manual_seed(0)
    chooser = ProposalPointer(
        channels=6, text_hidden_size=16, canvas_size=112, stride=8.0, dim=32, pool=2, reads="words"
    )
    log: list[dict] = []
    metrics = train_chooser(chooser, cache, torch.optim.AdamW(chooser.parameters(), lr=3e-3), epochs=12,
                            seed=0, log=lambda epoch, m: log.append(m))  # fmt: skip
    assert len(log) == 12 and log[-1] is metrics
    assert metrics["chooser_loss"] < 0.5 * log[0]["chooser_loss"]
    assert metrics["eval_chooser_accuracy"] > 0.85  # chance: about 1 / 5
    fresh = _planted_cache(200, 6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = choice_logits(chooser, fresh)
    chosen = logits.argmax(-1)
    assert not fresh.blocked.gather(1, chosen[:, None].clamp(max=5)).any() and (chosen < 6).all()
    assert math.isinf(float(logits[:, -1].max()))  # "none" is never the chooser's to say


def test_a_chooser_stage_trains_a_fresh_choice_pointer_and_leaves_the_rest(tmp_path):
    """From the shipped model: the stage caches every referring expression of 16 images (`refer_all`: many
    queries per image pass), the chooser's loss falls, the checkpoint loads with it, and nothing else
    changed."""
    data = {
        "init_from": str(DEFAULT_CHECKPOINT),
        "train": {"max_steps": 4, "batch_size": 4, "save_every": 1000, "log_every": 1, "eval_samples": 4},
        "stages": [{"name": "chooser", "kind": "chooser", "epochs": 8, "lr": 2e-3, "hflip_prob": 0.0,
                    "data": [{"kind": "synthetic", "dir": "w", "num_images": 16, "seed": 5, "image_size": 224,
                              "tasks": {"refer_all": 1},
                              "categories": ["circle", "square", "triangle", "star", "hexagon", "cross"]}]}],
    }  # fmt: skip
    final = Trainer(from_dict(TrainConfig, data), tmp_path).run()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "chooser_loss" in r]
    assert len(rows) == 8 and rows[0]["cached_queries"] >= 5 * 16  # one refer turn per expression
    assert rows[-1]["chooser_loss"] < 0.7 * rows[0]["chooser_loss"]
    before = GroundedLlavaForConditionalGeneration.from_pretrained(DEFAULT_CHECKPOINT).state_dict()
    after = GroundedLlavaForConditionalGeneration.from_pretrained(final)
    assert after.config.heads.chooser and after.chooser is not None
    state = after.state_dict()
    chooser = {k for k in state if k.startswith("chooser.")}
    assert chooser and set(state) == {k for k in before if not k.startswith("chooser.")} | chooser
    assert all(torch.equal(before[k], state[k]) for k in before if not k.startswith("chooser."))
    # a fresh chooser: not the one the shipped checkpoint may already hold
    assert any(k not in before or not torch.equal(before[k], state[k]) for k in chooser)
