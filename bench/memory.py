"""`peak_rss`: peak resident memory of a tiny-preset training run and of one `chat`, each in a fresh process.

The parent starts `python -m bench.memory --child MODE` for every mode (concurrently: each process
measures only itself); the child does the work and prints its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark, KiB on Linux) as the last
line of JSON. `import` (torch + transformers + grounded_llava, nothing built) is the fixed cost that
the two others include.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("import", "train", "chat")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train(work_dir: Path, steps: int, images: int) -> dict:
    """The tiny preset through `Trainer`: one `ground` stage (LoRA + heads, chat replay with KL), batch 4."""
    from grounded_llava import GroundedLlavaConfig
    from grounded_llava.training.config import LoopConfig, SourceConfig, StageConfig, TrainConfig
    from grounded_llava.training.trainer import Trainer

    world = dict(
        dir=str(work_dir / "world"), num_images=images, seed=3, categories=["circle", "square", "star"]
    )
    stage = StageConfig(
        name="ground",
        kind="ground",
        kl_weight=0.5,
        data=[
            SourceConfig(kind="synthetic", weight=0.75, **world),
            SourceConfig(kind="synthetic_chat", weight=0.25, **world),
        ],
    )
    config = TrainConfig(
        model=GroundedLlavaConfig.from_yaml(REPO / "configs" / "tiny.yaml"),
        stages=[stage],
        train=LoopConfig(max_steps=steps, batch_size=4, save_every=10**9, log_every=steps, eval_samples=4),
    )
    Trainer(config, work_dir / "run").run()
    return {"steps": steps, "batch_size": 4, "world_images": images}


def _chat(new_tokens: int) -> dict:
    """A tiny-preset model built from its config answering one prompt about one image."""
    from grounded_llava import GroundedLlavaConfig, GroundedLlavaForConditionalGeneration
    from grounded_llava.inference.predictor import GroundedLlava

    from .latency import PROMPT, benchmark_image, fixed_answer_length

    model = GroundedLlavaForConditionalGeneration.from_config(
        GroundedLlavaConfig.from_yaml(REPO / "configs" / "tiny.yaml")
    )
    predictor = GroundedLlava(model, device="cpu")
    with fixed_answer_length(model, new_tokens):
        predictor.chat(benchmark_image(), PROMPT, max_new_tokens=new_tokens)
    return {"new_tokens": new_tokens}


@dataclass
class Child:
    """A running measurement: its process and the files its stdout and stderr go to."""

    process: subprocess.Popen
    out: Path
    err: Path


def start_children(
    *, work_dir: Path, train_steps: int, train_images: int, new_tokens: int
) -> dict[str, Child]:
    """Start one fresh interpreter per mode (they run concurrently; each measures only itself)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    children = {}
    for mode in MODES:
        command = [sys.executable, "-m", "bench.memory", "--child", mode, "--work-dir", str(work_dir / mode),
                   "--steps", str(train_steps), "--images", str(train_images), "--new-tokens", str(new_tokens)]  # fmt: skip
        out, err = work_dir / f"{mode}.out", work_dir / f"{mode}.err"
        # Files, not pipes: nothing reads a pipe while the parent runs other benchmarks.
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr)
        children[mode] = Child(process=process, out=out, err=err)
    return children


def collect_children(children: dict[str, Child]) -> dict:
    """Wait for the children of `start_children`; peak RSS (MB) of the import-only, training and chat runs."""
    results = {}
    for mode, child in children.items():
        if child.process.wait() != 0:
            raise RuntimeError(
                f"memory child {mode!r} failed ({child.process.returncode}):\n{child.err.read_text()[-3000:]}"
            )
        results[mode] = json.loads(child.out.read_text().strip().splitlines()[-1])
    return {
        "train_mb": results["train"]["peak_rss_mb"],
        "chat_mb": results["chat"]["peak_rss_mb"],
        "import_mb": results["import"]["peak_rss_mb"],
        "train": results["train"],
        "chat": results["chat"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one peak-RSS measurement (run by bench/run.py)")
    parser.add_argument("--child", choices=MODES, required=True)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    # The fixed cost every mode pays: torch, transformers, peft, ultralytics, segment-anything, the package.
    import grounded_llava.inference  # noqa: F401
    import grounded_llava.modeling  # noqa: F401

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"mode": args.child}
    if args.child == "train":
        report |= _train(work_dir, args.steps, args.images)
    elif args.child == "chat":
        report |= _chat(args.new_tokens)
    report["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
