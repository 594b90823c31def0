"""The seam between the task-agnostic core and a task type.

`Task` is what the composition root (headless runs, the standalone UI) asks of a task before a run:
load the base model, find and check the data, build the previewer and extra observers.
`TrainingTask` is what the loop asks during a run: which records may share a batch, which layers
get adapters, the loss of a micro-batch, and how the adapter is written. Optimizer, scheduler,
plan, checkpoints, resume, OOM ladder, multi-process and monitoring stay in the core.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from ..lora.targets import LoraTarget


class TrainingTask(Protocol):
    output_path: Path         # what a finished run leaves in output_dir (a file or a folder)
    data_unit: str            # what the dataset index counts in num_images ("images", "samples")

    def batch_keys(self) -> Sequence:
        """Per dataset record: records with the same key may share a batch (image buckets,
        sequence-length buckets)."""

    def lora_targets(self, preset: str) -> list[LoraTarget]:
        """The layers that get an adapter: those of the target_modules preset (the adapter type
        may widen it, lora.adapters.adapter_setup)."""

    def init_network(self, network, say: Callable[[str], None]) -> None:
        """Load initial adapter weights the config names (incremental training), if any."""

    def prepare(self) -> None:
        """Fill caches before the first step (rank 0 first, then the others read them).
        Optional companion: ``release_cached_inputs() -> list[str]``, called after it and after
        every preview, takes the model parts whose outputs are all cached out of memory."""

    def loss(self, epoch: int, chunk: list[tuple[int, int]],
             autocast: Callable[[], ContextManager]) -> torch.Tensor:
        """Mean loss of a micro-batch of (position in epoch, record index): the mean of
        per-sample losses, so a step's gradient does not depend on how it is split."""

    def export(self, trainer, path: Path) -> None:
        """Write the adapter (at the trainer's current step) to `path`, atomically."""

    def snapshot_path(self, step: int) -> Path:
        """Where a `save_snapshots` copy of step `step` goes."""

    def describe(self, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
        """What the run trains on, for the console and train.log, before the first step."""

    def finish_hint(self) -> str:
        """How to use the finished adapter (end of the final message)."""

    def size_lever(self) -> str:
        """The first thing to lower when out of memory (e.g. 'lower resolution (now 512)')."""


class Task(Protocol):
    name: str

    def load_backbone(self, cfg, device: torch.device, dtype: torch.dtype) -> Any:
        """The base model, loaded offline from `cfg.base_model`."""

    def index_dataset(self, cfg) -> Any:
        """The dataset index: `records` (each with `repeats`), `num_samples`, `num_images`,
        `manifest_hash()`, `warnings`. Data errors name the file (and line)."""

    def check_data(self, index, cfg, logger=None, findings=None) -> Any:
        """The pre-training data check: log warnings, raise on errors, return the findings."""

    def training(self, cfg, backbone, index) -> TrainingTask: ...

    def previewer(self, cfg) -> Any:
        """Object with `render(trainer, step) -> list of paths`, or None."""

    def observers(self, cfg, backbone, index) -> list:
        """Extra rank-0 observers of this task (e.g. the WebUI card writer)."""
