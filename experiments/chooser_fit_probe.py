"""Chooser fit probe (docs/EXPERIMENTS.md E24): the chooser stage fits its cache (train accuracy 1.00) but
holds out at 0.83. Which change to its training generalises better to a world it never saw?

The model's vision tower and heads run once over `refer` samples of a training world (as the `chooser`
stage caches them, `cache_choice_queries`) and of a held-out world; fresh choosers then train on the
training cache under each setting and are scored on the held-out one every epoch.

    python experiments/chooser_fit_probe.py MODEL TRAIN_WORLD VAL_WORLD [SAMPLES_PER_IMAGE]
"""

import sys

import torch
from torch.utils.data import DataLoader

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.dataset import GroundedCollator, GroundedDataset
from grounded_llava.data.tasks import TaskConfig, build_task_samples
from grounded_llava.modeling.pointer import pointer_loss
from grounded_llava.training.chooser_stage import ChoiceCache, cache_choice_queries, choice_logits


def cache_world(model, world: str, samples_per_image: int, hflip: float, task: str = "refer") -> ChoiceCache:
    data = load_coco_instances(f"{world}/annotations.json", f"{world}/images")
    samples = build_task_samples(data, config=TaskConfig(weights={task: 1}, num_bins=model.config.num_bins),
                                 seed=0, samples_per_image=samples_per_image)  # fmt: skip
    dataset = GroundedDataset(samples, model.processor, categories=model.config.heads.categories,
                              mask_resolution=model.mask_head.mask_resolution, hflip_prob=hflip)  # fmt: skip
    loader = DataLoader(dataset, batch_size=16, collate_fn=GroundedCollator(model.processor))
    return cache_choice_queries(model, loader, torch.device("cpu"), total=len(loader), desc=world)


def accuracy(chooser, cache: ChoiceCache) -> float:
    with torch.no_grad():
        return float(pointer_loss(choice_logits(chooser, cache), cache.targets())[1])


def fit(model, train: ChoiceCache, val: ChoiceCache, *, epochs=30, lr=1e-3, weight_decay=0.01, dim=128,
        dropout=0.0) -> list[float]:  # fmt: skip
    torch.manual_seed(0)
    chooser = model.pointer.fresh_copy(reads="words", dim=dim)
    drop = torch.nn.Dropout(dropout)
    optimizer = torch.optim.AdamW(chooser.parameters(), lr=lr, weight_decay=weight_decay)
    curve = []
    for _ in range(epochs):
        chooser.train()
        for index in torch.randperm(len(train)).split(64):
            part = train.rows(index)
            part.pooled = drop(part.pooled)
            loss, _ = pointer_loss(choice_logits(chooser, part), part.targets())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        chooser.eval()
        curve.append(accuracy(chooser, val))
    return curve


def main(model_dir: str, train_world: str, val_world: str, samples_per_image: int = 2) -> None:
    model = GroundedLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    train = cache_world(model, train_world, samples_per_image, hflip=0.5)
    val = cache_world(model, val_world, 5, hflip=0.0)  # about every object of the world, once or more
    print(f"cached: train {len(train)}, held-out {len(val)}")
    settings = {
        "baseline": {},
        "wd 0.1": {"weight_decay": 0.1},
        "dropout 0.3": {"dropout": 0.3},
        "dropout 0.5": {"dropout": 0.5},
        "dim 64": {"dim": 64},
        "half data": {"_half": True},
    }
    for name, kwargs in settings.items():
        data = train.rows(torch.arange(len(train) // 2)) if kwargs.pop("_half", False) else train
        curve = fit(model, data, val, **kwargs)
        best = max(range(len(curve)), key=curve.__getitem__)
        print(f"{name:14s} last {curve[-1]:.3f}  best {curve[best]:.3f} @ epoch {best + 1}  "
              f"epochs 5/10/20: {curve[4]:.3f} {curve[9]:.3f} {curve[19]:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
