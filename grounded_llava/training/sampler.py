"""A resumable, deterministic, rank-sharded index stream over one or several concatenated sources.

The order of an epoch is a pure function of `(seed, epoch)`: every rank computes the same global
order and takes its own slice, so no communication is needed and a resumed run recomputes it.

Mixing: with sources of sizes `[n_0, n_1, ...]` laid out as in `torch.utils.data.ConcatDataset`
(source `s` owns global indices `offset_s .. offset_s + n_s - 1`) and weights `[w_0, w_1, ...]`,
an epoch of `epoch_length` samples holds exactly `round(w_s * epoch_length)` samples of source `s`
(largest-remainder rounding, so the counts sum to `epoch_length`), interleaved in a random order.
Within a source, samples are drawn without replacement from fresh permutations, so a source
smaller than its share is cycled through whole passes before any index repeats.

Source blocks: with `source_block` = k > 1 the order is made of blocks of k consecutive samples of one
source (k = batch size x ranks: every batch holds one source). The epoch is then a whole number of
blocks, shared among the sources by the same largest-remainder rule. Sources whose sequences differ in
length (long chat, short grounding tasks) then pad within their own batches only (docs/EXPERIMENTS.md E35).

Position: `position` counts GLOBAL samples consumed in the current epoch (all ranks together).
It is advanced explicitly by the training loop with `advance(samples_per_rank)` once a batch has
really been used, never by iterating: a DataLoader with workers prefetches ahead, so "yielded" is
not "trained on". Because sharding starts at `position`, a run can even resume on another number
of ranks without losing or repeating a sample.

Exact resume with a `torch.utils.data.DataLoader`: give it its own `generator=torch.Generator()`.
Without one, every `iter(loader)` draws a worker seed from the global torch RNG, and a resumed run
creates its iterators at other steps than the uninterrupted one, so dropout masks would differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

SAMPLER_STATE_VERSION = 1


def _largest_remainder_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum to `total` (Hamilton's method)."""
    quotas = weights / weights.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties broken by source order (stable sort on the negated fractional part): deterministic.
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


class ResumableSampler(Sampler[int]):
    """Yields this rank's share of a deterministic global order of indices into concatenated sources.

    Args:
        source_sizes: length of every source, in the order they are concatenated.
        weights: mixing weight of every source (any positive scale); default: proportional to size.
        epoch_length: global samples per epoch; default: the total size of all sources.
        seed: the order of epoch `e` depends only on `(seed, e)`.
        num_replicas: number of ranks sharing the stream (e.g. `accelerator.num_processes`).
        rank: this rank, in `[0, num_replicas)` (e.g. `accelerator.process_index`).
        source_block: consecutive samples drawn from one source (module docstring); 1 mixes per sample.

    Every rank yields the same number of indices per epoch: the tail of the global order that does
    not fill one index per rank is dropped (like `DistributedSampler(drop_last=True)`).
    """

    def __init__(
        self,
        *,
        source_sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        source_block: int = 1,
    ) -> None:
        sizes = [int(n) for n in source_sizes]
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(
                f"source_sizes must be a non-empty list of positive lengths, got {list(source_sizes)}"
            )
        if weights is None:
            weights = [float(n) for n in sizes]
        if len(weights) != len(sizes):
            raise ValueError(f"weights {list(weights)} must have one entry per source (source_sizes={sizes})")
        if any(not (w > 0) for w in weights):
            raise ValueError(f"weights must all be > 0, got {list(weights)}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must lie in [0, num_replicas={num_replicas})")
        if source_block < 1:
            raise ValueError(f"source_block must be >= 1, got {source_block}")
        length = sum(sizes) if epoch_length is None else int(epoch_length)
        length -= length % source_block  # whole blocks
        if length < num_replicas:
            raise ValueError(
                f"epoch_length {length} (whole blocks of {source_block}) is smaller than num_replicas {num_replicas}"
            )
        self.source_sizes = sizes
        self.weights = [float(w) for w in weights]
        self.source_block = int(source_block)
        self.epoch_length = length
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._cached_epoch: int | None = None
        self._cached_order: np.ndarray | None = None

    @property
    def samples_per_source(self) -> list[int]:
        """How many samples of each source one epoch holds (whole blocks; sums to `epoch_length`)."""
        blocks = _largest_remainder_counts(np.asarray(self.weights), self.epoch_length // self.source_block)
        return (blocks * self.source_block).tolist()

    def global_order(self, epoch: int) -> np.ndarray:
        """`(epoch_length,)` int64 global indices (into the concatenated sources) of `epoch`, all ranks."""
        if self._cached_epoch == epoch and self._cached_order is not None:
            return self._cached_order
        rng = np.random.default_rng([self.seed, epoch])
        offsets = np.cumsum([0, *self.source_sizes[:-1]])
        counts = self.samples_per_source
        per_source = []
        for size, offset, count in zip(self.source_sizes, offsets, counts, strict=True):
            passes = -(-count // size)  # ceil: whole permutations, so no index repeats within a pass
            drawn = np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]
            per_source.append(drawn + offset)
        blocks = np.asarray(counts) // self.source_block
        labels = rng.permutation(np.repeat(np.arange(len(counts)), blocks)).repeat(self.source_block)
        order = np.empty(self.epoch_length, dtype=np.int64)
        for source, drawn in enumerate(per_source):
            order[labels == source] = drawn
        self._cached_epoch, self._cached_order = epoch, order
        return order

    @property
    def _usable_length(self) -> int:
        """Global samples of an epoch that are handed out (a whole number of steps across ranks)."""
        return self.epoch_length - (self.epoch_length - self.position) % self.num_replicas

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining indices of the current epoch, from `position` on (does not advance it)."""
        order = self.global_order(self.epoch)
        return iter(order[self.position + self.rank : self._usable_length : self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.epoch_length - self.position) // self.num_replicas

    @property
    def epoch_finished(self) -> bool:
        """True when fewer than one sample per rank is left in the current epoch."""
        return len(self) == 0

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`, starting at its first sample; the current epoch keeps its position (resume)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank has consumed `samples_per_rank` more samples (call after each step)."""
        new_position = self.position + samples_per_rank * self.num_replicas
        if samples_per_rank < 0 or new_position > self.epoch_length:
            raise ValueError(
                f"cannot advance by {samples_per_rank} samples per rank: position {self.position} "
                f"+ {samples_per_rank} x {self.num_replicas} ranks exceeds epoch_length {self.epoch_length}"
            )
        self.position = new_position

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restore with `load_state_dict` to continue with the next sample."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "source_sizes": list(self.source_sizes),
            "weights": list(self.weights),
            "epoch_length": self.epoch_length,
            "source_block": self.source_block,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `epoch` and `position`; the order-defining fields must match this sampler's.

        `num_replicas` may differ (resume on another number of ranks): positions are global.
        """
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise ValueError(
                f"sampler state version {state.get('version')!r} is not supported (expects {SAMPLER_STATE_VERSION})"
            )
        mine = self.state_dict()
        state = {"source_block": 1} | state  # saved before source blocks existed
        for key in ("seed", "source_sizes", "weights", "epoch_length", "source_block"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"sampler state field {key!r} = {state[key]!r} does not match this sampler's {mine[key]!r}: "
                    "the data order would differ from the interrupted run"
                )
        if not 0 <= int(state["position"]) <= self.epoch_length:
            raise ValueError(
                f"sampler state position {state['position']} is outside [0, {self.epoch_length}]"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def endless_batches(loader: Iterable, sampler: ResumableSampler) -> Iterator:
    """Endless batches of `loader` (driven by `sampler`); a new epoch starts when the current one runs out."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded and sampler.position == 0:
            raise ValueError("the stage's data is smaller than one batch: lower train.batch_size")
        sampler.set_epoch(sampler.epoch + 1)
