"""Side-by-side timing: variants run interleaved in one process, warm-up excluded, medians compared.

On a shared, loaded machine absolute times drift; interleaving the variants repeat by repeat exposes
them to the same load, so the ratio of their medians stays meaningful.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    """Seconds per call of each variant: every kept sample (`samples`, warm-up excluded) and their median."""

    samples: dict[str, list[float]]
    warmup: int

    @property
    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}

    def ratio(self, numerator: str, denominator: str) -> float:
        medians = self.medians
        return medians[numerator] / medians[denominator]

    def to_dict(self) -> dict:
        return {
            "median_s": self.medians,
            "samples_s": self.samples,
            "repeats": len(next(iter(self.samples.values()))),
            "warmup": self.warmup,
        }


def interleaved(variants: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> Timing:
    """Call every variant once per round (the order alternates each round), `warmup + repeats` rounds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return Timing(samples=samples, warmup=warmup)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores, load and the library versions the figures were taken with."""
    from importlib import metadata

    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for package in ("transformers", "peft", "ultralytics"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info
