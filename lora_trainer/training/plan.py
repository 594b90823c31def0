"""How a run is cut into epochs, batches and optimizer steps.

Everything here is a pure function of (dataset, config): a resumed run recomputes the exact same
plan instead of storing it, and only stores *where* it was (epoch, batch position, global step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.order import batches as make_batches
from ..data.order import epoch_samples


@dataclass(frozen=True)
class StepSlice:
    epoch: int
    first_batch: int          # index of the step's first batch inside the epoch
    batches: list             # list of batches; a batch is a list of (position in epoch, record index)


@dataclass(frozen=True)
class TrainingPlan:
    num_samples: int          # samples per epoch (images x repeats)
    batch_size: int
    accumulation: int
    epochs: int
    max_train_steps: int | None
    batches_per_epoch: int    # from count_batches: with buckets, more than num_samples/batch_size

    @property
    def steps_per_epoch(self) -> int:
        # the last step of an epoch may have fewer batches: accumulation never spans epochs
        return math.ceil(self.batches_per_epoch / self.accumulation)

    @property
    def total_steps(self) -> int:
        """kohya's rule: max_train_steps, when set, is the length of the run whichever way it
        differs from `epochs` (200 steps on 40 steps per 10 epochs trains 200, in 50 epochs)."""
        return self.max_train_steps or self.steps_per_epoch * self.epochs

    @property
    def epochs_to_run(self) -> int:
        """Epochs the run touches: `epochs`, or as many as max_train_steps needs (the last may
        be cut short)."""
        if self.max_train_steps:
            return math.ceil(self.max_train_steps / self.steps_per_epoch)
        return self.epochs

    def describe_length(self) -> str:
        """What bounds the run, said at its start (so an unexpected length is no surprise)."""
        per_epoch = f"{self.steps_per_epoch} steps per epoch"
        if not self.max_train_steps:
            return f"Training {self.total_steps} steps: epochs {self.epochs} x {per_epoch}."
        return (f"Training {self.total_steps} steps: max_train_steps sets the length (epochs "
                f"{self.epochs} is not used; {per_epoch}, so {self.epochs_to_run} epoch(s)).")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation


def epoch_batches(index, epoch: int, seed: int, batch_size: int, buckets=None) -> list[list[tuple[int, int]]]:
    """The epoch's batches; a batch is a list of (position in epoch, record index), all from one
    bucket. Batches are ordered by their first sample's position in the epoch's permutation, which
    interleaves buckets without another random draw — and with one bucket is plain chunking."""
    samples = epoch_samples(index, epoch, seed)
    by_bucket: dict[object, list[tuple[int, int]]] = {}
    for position, record in enumerate(samples):
        key = buckets[record] if buckets is not None else None
        by_bucket.setdefault(key, []).append((position, record))
    batches = [batch for group in by_bucket.values() for batch in make_batches(group, batch_size)]
    return sorted(batches, key=lambda batch: batch[0][0])


def count_batches(index, batch_size: int, buckets=None) -> int:
    """Batches per epoch (the same every epoch: bucket sizes do not depend on the order)."""
    counts: dict = {}
    for i, record in enumerate(index.records):
        key = buckets[i] if buckets is not None else None
        counts[key] = counts.get(key, 0) + record.repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())


def iterate_steps(plan: TrainingPlan, index, seed: int, start_epoch: int, start_batch: int, buckets=None):
    """Yield the StepSlices from (start_epoch, start_batch) to the end of the plan (the caller
    stops after plan.total_steps steps in all)."""
    for epoch in range(start_epoch, plan.epochs_to_run):
        batches = epoch_batches(index, epoch, seed, plan.batch_size, buckets)
        first = start_batch if epoch == start_epoch else 0
        for b in range(first, len(batches), plan.accumulation):
            yield StepSlice(epoch, b, batches[b:b + plan.accumulation])
