"""What goes into `<run_dir>/logs/train.log` besides the trainer's own messages: the effective
config, the environment, the dataset, a progress line every `log_every_n_steps` steps, and
checkpoint/preview events. The file itself (rotation, flushing) is `logfile.attach_run_log`; this
module only writes records to the 'lora_trainer.run' logger, whose records reach that file.

The point is a log that answers a bug report alone: which versions, which settings, how fast,
how much memory, what happened last before it died.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter

from ..config.load import dump_config
from ..contracts.backbone import Backbone
from ..training.control import TrainingObserver
from . import system

log = logging.getLogger("lora_trainer.run")
FILE_ONLY = {"file_only": True}   # the console has its progress bar; these lines are for the file
# the periodic "step n/N … loss … it/s" line: file-only on the console, but the tab's log tail,
# which has no progress bar of text, shows it
PROGRESS_LINE = {"file_only": True, "progress_line": True}


def _info(text: str, *args, extra=FILE_ONLY) -> None:
    log.info(text, *args, extra=extra)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def dataset_summary(index) -> str:
    summary = getattr(index, "summary", None)
    if callable(summary):   # an index of another task type describes itself (tasks/causal_lm)
        return f"dataset: {summary()}"
    records = index.records
    lines = [f"dataset: {index.num_images} images, {index.num_samples} samples per epoch, root {index.root}"]
    if index.metadata_path:
        lines.append(f"  captions from {index.metadata_path}")
    folders = Counter(f"{r.repeats}_{r.folder}" if r.folder else f"{r.repeats}x (root)" for r in records)
    lines.append("  folders: " + ", ".join(f"{name} ({count} images)" for name, count in sorted(folders.items())))
    if records:
        widths, heights = [r.width for r in records], [r.height for r in records]
        lines.append(f"  image sizes: {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px")
    sources = Counter(r.caption_source for r in records)
    lines.append("  caption sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    if index.warnings:
        lines.append(f"  {len(index.warnings)} dataset warning(s), listed above")
    return "\n".join(lines)


def preview_cost(cfg, from_step: int, total_steps: int, step_seconds: float) -> tuple[float, int]:
    """(seconds, images) of the previews still to come after ``from_step``, the end-of-run render
    (the last previews, or the card's thumbnail when there are no prompts) included; ``from_step``
    0 counts the previews before the first step too. A sampling step is about two UNet forwards
    (guidance) and a training step about three (forward + backward), so an image costs about
    preview_steps x 2/3 training steps at the training size, scaled by the preview's pixels."""
    prompts = len(cfg.preview_prompts) + max(len(cfg.preview_weight_sweep) - 1, 0)
    if prompts:
        every = cfg.preview_every_n_steps
        periodic = (total_steps - 1) // every - from_step // every if every else 0
        images = (max(periodic, 0) + 1 + (from_step == 0)) * prompts
    else:
        images = 1 if cfg.write_card else 0
    width, height = cfg.preview_width or cfg.resolution, cfg.preview_height or cfg.resolution
    pixels = width * height / (cfg.resolution ** 2 * cfg.batch_size)
    guidance = 1.0 if cfg.preview_cfg_scale != 1 else 0.5
    return images * cfg.preview_steps * (2 / 3) * guidance * pixels * step_seconds, images


class RunLog(TrainingObserver):
    """Progress, memory and events of one run, into train.log."""

    def __init__(self, device, every_n_steps: int, cfg=None):
        self.cfg = cfg   # for the previews still to come in the ETA
        self.device = device
        self.every = max(1, int(every_n_steps))
        self.session_start = time.perf_counter()
        self._window_start = self.session_start
        self._window_steps = 0
        self._window_losses: list[float] = []
        self._logged_once = False

    def write_header(self, cfg, backbone: Backbone, index) -> None:
        env = system.environment_info(backbone.device, backbone.dtype)
        _info("environment: %s", " ".join(f"{k}={v}" for k, v in env.items()))
        identity = backbone.identity()
        _info("base model: %s", " ".join(f"{k}={v}" for k, v in identity.items()))
        _info("effective config:\n%s", dump_config(cfg).rstrip())
        _info("%s", dataset_summary(index))

    # ---- observer ----------------------------------------------------------------------------------
    def on_start(self, info):
        self._window_start = time.perf_counter()
        _info("run %s at step %d of %d: %d epochs x %d steps, effective batch %d, %d LoRA layers "
              "(%s trainable parameters), LoRA file %s",
              "resumed" if info["resumed"] else "started", info["start_step"], info["total_steps"],
              info["epochs"], info["steps_per_epoch"], info["effective_batch"], info["lora_layers"],
              f"{info['trainable_parameters']:,}", info["lora_path"])
        _info("memory at start: %s", system.format_memory(system.device_memory(self.device)))

    def on_step(self, report):
        self._window_steps += 1
        self._window_losses.append(report.loss)
        due = report.step % self.every == 0 or report.step == report.total_steps
        if due or not self._logged_once:   # the first step too: early proof that training runs
            self._log_progress(report)

    def _log_progress(self, report) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        steps_per_s = self._window_steps / elapsed
        eta = (report.total_steps - report.step) / steps_per_s
        if self.cfg is not None:   # the previews and the card's end-of-run render are part of the wait
            eta += preview_cost(self.cfg, report.step, report.total_steps, 1 / steps_per_s)[0]
        mean_loss = sum(self._window_losses) / len(self._window_losses)
        grad = f" grad_norm {report.grad_norm:.4g}" if report.grad_norm is not None else ""
        util = system.gpu_utilisation(self.device)
        gpu = f" gpu_util {util}%" if util is not None else ""
        _info("step %d/%d epoch %d loss %.5f (mean of %d: %.5f) lr %.3e%s | %.3f it/s %.2f samples/s "
              "ETA %s | memory %s%s", report.step, report.total_steps, report.epoch, report.loss,
              len(self._window_losses), mean_loss, report.lr, grad, steps_per_s,
              report.samples / max(report.seconds, 1e-9), format_duration(eta),
              system.format_memory(system.device_memory(self.device)), gpu, extra=PROGRESS_LINE)
        self._window_start, self._window_steps, self._window_losses = now, 0, []
        self._logged_once = True

    def on_checkpoint(self, step, path):
        _info("event checkpoint: step %d -> %s", step, path)

    def on_lora_saved(self, path):
        _info("event lora_saved: %s", path)

    def on_preview(self, step, paths):
        _info("event preview: step %d, %d image(s): %s", step, len(paths), ", ".join(map(str, paths)))

    def on_end(self, result):
        seconds = time.perf_counter() - self.session_start
        _info("run %s at step %d of %d after %s in this session | memory %s", result.status,
              result.step, result.total_steps, format_duration(seconds),
              system.format_memory(system.device_memory(self.device)))


@contextlib.contextmanager
def run_monitors(cfg, backbone: Backbone, index):
    """The observers every run gets (train.log lines, TensorBoard when available); closed on exit,
    also when training fails, so event files are complete for a crashed run too."""
    from .tensorboard_log import open_tensorboard

    run_log = RunLog(backbone.device, cfg.log_every_n_steps, cfg)
    run_log.write_header(cfg, backbone, index)
    monitors: list[TrainingObserver] = [run_log]
    board = open_tensorboard(cfg, backbone.device)
    if board is not None:
        monitors.append(board)
    try:
        yield monitors
    finally:
        for monitor in monitors:
            getattr(monitor, "close", lambda: None)()
