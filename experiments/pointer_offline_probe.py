"""Offline pointer probe (docs/EXPERIMENTS.md E20): can a pointer head, trained long on what the frozen
model gives it, tell same-class objects apart?

The frozen model runs once over teacher-forced samples of a training world (detect / find / refer) and
`refer` samples of a held-out world;
the pointer's inputs are stored per `<box>` query (the LLM query states, the pooled region inputs and
geometry, the positives). Then pointer heads train on the stored inputs alone (seconds per epoch) and are
scored on the held-out `refer` queries, split by whether the target's class is shared by another reported
proposal of its image (the query must then use colour, size or position).

    python experiments/pointer_offline_probe.py MODEL TRAIN_WORLD VAL_WORLD [--epochs 30] [--out OUT_MODEL]
        [--train-tasks detect=2,find=2,refer=6]

With --out, the model with the freshly trained pointer is saved there (to evaluate end to end). E20's
refer-only pointer (`runs/offline-pointer-refer`, used by E21): `--train-tasks refer=1`.
"""

import argparse
import copy

import torch
from torch.utils.data import DataLoader

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.dataset import GroundedCollator, GroundedDataset
from grounded_llava.data.tasks import TaskConfig, build_task_samples
from grounded_llava.modeling import prompts
from grounded_llava.modeling.pointer import pointer_loss, region_inputs


@torch.no_grad()
def collect(model, world: str, samples_per_image: int, tasks: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per `<box>` query: query (2D), pooled (K, P), geometry (K, 9), blocked (K + 1), positives (K + 1), shared."""
    data = load_coco_instances(f"{world}/annotations.json", f"{world}/images")
    samples = build_task_samples(data, config=TaskConfig(weights=tasks, num_bins=model.config.num_bins), seed=0,
                                 samples_per_image=samples_per_image)  # fmt: skip
    dataset = GroundedDataset(samples, model.processor, categories=model.config.heads.categories,
                              mask_resolution=model.mask_head.mask_resolution)  # fmt: skip
    loader = DataLoader(dataset, batch_size=16, collate_fn=GroundedCollator(model.processor))
    captured: dict[str, list] = {
        k: [] for k in ("query", "pooled", "geometry", "blocked", "positives", "shared")
    }
    pointer, seen = model.pointer, {}
    original_embeddings, original_forward, original_loss = (
        pointer.region_embeddings, pointer.forward, prompts.pointer_loss)  # fmt: skip

    def region_embeddings(feature_map, proposals):
        seen["inputs"] = region_inputs(feature_map, proposals, pool=pointer.pool, stride=pointer.stride,
                                       canvas_size=pointer.canvas_size)  # fmt: skip
        seen["proposals"] = proposals
        return original_embeddings(feature_map, proposals)

    def forward(query_hidden, query_image, regions, valid, excluded=None):
        seen["query"], seen["image"], seen["excluded"] = query_hidden, query_image, excluded
        return original_forward(query_hidden, query_image, regions, valid, excluded)

    def loss(logits, positives):
        pooled, geometry = seen["inputs"]
        proposals, image = seen["proposals"], seen["image"]
        blocked = ~proposals.valid[image] | seen["excluded"]
        target = positives[:, :-1].float().argmax(-1)
        classes = proposals.class_ids[image]
        reported = proposals.valid[image] & (proposals.scores[image] >= model.config.heads.conf_threshold)
        same = (classes == classes.gather(1, target[:, None])) & reported
        captured["query"].append(seen["query"].float())
        captured["pooled"].append(pooled[image].float())
        captured["geometry"].append(geometry[image].float())
        captured["blocked"].append(torch.cat([blocked, blocked.new_zeros((len(image), 1))], 1))
        captured["positives"].append(positives)
        captured["shared"].append((same.sum(1) > 1) & positives[:, :-1].any(1))
        return original_loss(logits, positives)

    pointer.region_embeddings, pointer.forward, prompts.pointer_loss = region_embeddings, forward, loss
    try:
        for batch in loader:
            model(**batch.batch.model_inputs(), compute_masks=False)
    finally:
        pointer.region_embeddings, pointer.forward, prompts.pointer_loss = (
            original_embeddings, original_forward, original_loss)  # fmt: skip
    return {k: torch.cat(v) for k, v in captured.items()}


def logits_of(head, data: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    regions = head.region(data["pooled"][rows]) + head.geometry(data["geometry"][rows])
    query = head.query(data["query"][rows])
    options = torch.cat([regions, head.none.expand(len(rows), 1, -1)], 1)
    logits = torch.einsum("md,mkd->mk", query, options) * head.scale
    return logits.masked_fill(data["blocked"][rows], float("-inf"))


@torch.no_grad()
def accuracy(head, data: dict[str, torch.Tensor]) -> dict[str, float]:
    rows = torch.arange(len(data["query"]))
    right = data["positives"].gather(1, logits_of(head, data, rows).argmax(-1, keepdim=True))[:, 0]
    shared = data["shared"]
    return {"all": right.float().mean().item(), "shared": right[shared].float().mean().item(),
            "unique": right[~shared].float().mean().item(), "n_shared": int(shared.sum())}  # fmt: skip


def train(head, data: dict[str, torch.Tensor], epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(epochs):
        for rows in torch.randperm(len(data["query"])).split(64):
            loss, _ = pointer_loss(logits_of(head, data, rows), data["positives"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main(
    model_dir: str,
    train_world: str,
    val_world: str,
    epochs: int,
    out: str | None,
    train_tasks: dict[str, float],
) -> None:
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    train_data = collect(model, train_world, 2, train_tasks)
    val_data = collect(model, val_world, 4, {"refer": 1.0})
    print(f"queries: train {len(train_data['query'])}, val {len(val_data['query'])}")
    print("shipped pointer        ", accuracy(model.pointer, val_data))
    for name, head, lr in [("shipped, trained more", copy.deepcopy(model.pointer), 1e-3),
                           ("fresh", type(model.pointer)(channels=val_data["pooled"].shape[-1] // model.pointer.pool**2,
                            text_hidden_size=val_data["query"].shape[-1] // 2, canvas_size=model.pointer.canvas_size,
                            stride=model.pointer.stride, pool=model.pointer.pool), 1e-3)]:  # fmt: skip
        for step in range(0, epochs, 10):
            train(head, train_data, 10, lr)
            print(f"{name:22s} epoch {step + 10:3d}", "train", accuracy(head, train_data)["all"], "val",
                  accuracy(head, val_data))  # fmt: skip
    if out is not None:
        model.pointer.load_state_dict(head.state_dict())  # the last head: the fresh one
        model.save_pretrained(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model"), parser.add_argument("train_world"), parser.add_argument("val_world")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--train-tasks", default="detect=2,find=2,refer=6",
                        help="task=weight,...: the training queries (detect lists teach list ends)")  # fmt: skip
    args = parser.parse_args()
    tasks = {k: float(v) for k, v in (item.split("=") for item in args.train_tasks.split(","))}
    main(args.model, args.train_world, args.val_world, args.epochs, args.out, tasks)
