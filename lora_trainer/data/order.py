"""Deterministic, stateless sample order and per-sample randomness.

Why stateless: everything here is a pure function of (seed, epoch, position). A resumed run
recomputes the epoch's order and skips to its position instead of restoring a pickled RNG state or
a stored list, so
  * resume is exact: sample k of epoch e is the same image, with the same crop and caption, whether
    the run was interrupted or not;
  * randomness does not depend on batching: each sample gets its own RNG keyed by its position in
    the epoch, not by how many draws earlier batches made. Changing the (micro-)batch size or
    gradient accumulation regroups the same samples with the same crops and captions;
  * nothing needs saving in checkpoints beyond (epoch, position).

Version stability: the permutation is built from raw PCG64 output (bit generator streams are fixed
by NumPy's compatibility policy, unlike Generator.permutation/shuffle, which may change between
NumPy releases), and the per-sample seed is a SHA-256 digest. So a NumPy upgrade between pause and
resume does not reshuffle the epoch.
"""
from __future__ import annotations

import hashlib
import random
from typing import List, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# Mixed into the seeds so the data order is not correlated with other streams seeded from the same
# user seed (noise, timesteps, dropout in the model).
_ORDER_STREAM = 0x6C6F72615F6F7264  # "lora_ord"
_SAMPLE_STREAM = "lora_trainer.sample.v1"
_UINT64 = 1 << 64


def epoch_samples(index, epoch: int, seed: int) -> List[int]:
    """Record index for each sample of `epoch`: every record appears `repeats` times, shuffled.

    `index` is a DatasetIndex, a sequence of records (anything with `.repeats`), or a sequence of
    repeat counts.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    repeats = _repeat_counts(index)
    record_per_sample = np.repeat(np.arange(len(repeats), dtype=np.int64), repeats)
    bits = np.random.PCG64(np.random.SeedSequence([_ORDER_STREAM, _as_uint64(seed), epoch]))
    # Sorting by uniform random 64-bit keys is a uniform random permutation; the stable sort makes
    # even a (practically impossible) key tie deterministic.
    keys = bits.random_raw(len(record_per_sample))
    order = np.argsort(keys, kind="stable")
    return record_per_sample[order].tolist()


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 64-bit seed for the sample at `position` of `epoch`; also usable for a torch.Generator."""
    key = f"{_SAMPLE_STREAM}:{int(seed)}:{int(epoch)}:{int(position)}".encode("ascii")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The RNG for one sample's random choices (crop position, caption shuffle/dropout).

    Use it for that sample only, always in the same order (e.g. crop first, then caption), so the
    draws are identical on every run and resume.
    """
    return random.Random(sample_seed(seed, epoch, position))


def batches(samples: Sequence[T], batch_size: int) -> List[List[T]]:
    """Consecutive batches of `samples`; the last, partial batch is kept (no image is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = list(samples)
    return [samples[start:start + batch_size] for start in range(0, len(samples), batch_size)]


def _repeat_counts(index) -> List[int]:
    items: Sequence = getattr(index, "records", index)
    counts = [int(getattr(item, "repeats", item)) for item in items]
    if any(count < 0 for count in counts):
        raise ValueError("repeats must be >= 0")
    return counts


def _as_uint64(seed: int) -> int:
    # SeedSequence rejects negative numbers; map them onto the unsigned range instead of failing.
    return int(seed) % _UINT64
