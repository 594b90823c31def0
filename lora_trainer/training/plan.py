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

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        # the last step of an epoch may have fewer batches: accumulation never spans epochs
        return math.ceil(self.batches_per_epoch / self.accumulation)

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.epochs
        return min(full, self.max_train_steps) if self.max_train_steps else full

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation


def epoch_batches(index, epoch: int, seed: int, batch_size: int) -> list[list[tuple[int, int]]]:
    samples = epoch_samples(index, epoch, seed)
    positioned = list(enumerate(samples))   # (position in epoch, record index)
    return make_batches(positioned, batch_size)


def iterate_steps(plan: TrainingPlan, index, seed: int, start_epoch: int, start_batch: int):
    """Yield the StepSlices from (start_epoch, start_batch) to the end of the plan (at most
    plan.total_steps steps in all are taken by the caller)."""
    for epoch in range(start_epoch, plan.epochs):
        batches = epoch_batches(index, epoch, seed, plan.batch_size)
        first = start_batch if epoch == start_epoch else 0
        for b in range(first, len(batches), plan.accumulation):
            yield StepSlice(epoch, b, batches[b:b + plan.accumulation])
