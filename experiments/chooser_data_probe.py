"""Chooser data probe (docs/EXPERIMENTS.md E25): does a cache of every referring expression of each image
(`refer_all`, one vision pass per image) choose better than one random expression per sample (`refer`, one
vision pass per sample, as v16's chooser stage caches 4 per image)?

Fresh choosers train on each training cache and are scored, every epoch, on every expression of a
held-out world (`refer_all`).

    python experiments/chooser_data_probe.py MODEL TRAIN_WORLD VAL_WORLD
"""

import sys
import time

from chooser_fit_probe import cache_world, fit

from grounded_llava import GroundedLlavaForConditionalGeneration


def main(model_dir: str, train_world: str, val_world: str) -> None:
    model = GroundedLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    val = cache_world(model, val_world, 1, hflip=0.0, task="refer_all")
    runs = {"refer x4 (v16), 30 epochs": ("refer", 4, 30), "refer_all x1, 8 epochs": ("refer_all", 1, 8)}
    for name, (task, samples_per_image, epochs) in runs.items():
        start = time.perf_counter()
        train = cache_world(model, train_world, samples_per_image, hflip=0.5, task=task)
        cached = time.perf_counter()
        curve = fit(model, train, val, epochs=epochs)
        print(f"{name}: {len(train)} queries (cache {cached - start:.0f} s, fit {time.perf_counter() - cached:.0f} s); "
              f"held-out ({len(val)} queries) last {curve[-1]:.3f} best {max(curve):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
