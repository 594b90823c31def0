"""TensorBoard events in `<run_dir>/tensorboard`: loss (raw and smoothed), lr, grad norm, speed,
memory, and the preview images. Optional: without tensorboard installed (or with cfg.tensorboard
off) `open_tensorboard` returns None and the run goes on without it.

View with: tensorboard --logdir <run_dir>/tensorboard
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..training.control import TrainingObserver
from . import system

log = logging.getLogger("lora_trainer.run")
EMA_DECAY = 0.9   # smoothing of loss/ema; the raw loss of one step is mostly timestep noise


def open_tensorboard(cfg, device) -> TensorBoardLog | None:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as error:   # ImportError, or a protobuf/tensorboard version clash at import
        log.info("TensorBoard logging off: %s (pip install tensorboard to enable it)", error)
        return None
    return TensorBoardLog(SummaryWriter, Path(cfg.run_dir) / "tensorboard", device)


def _never_fails(method):
    """A full disk or a broken tensorboard install must not end a long training run: the first
    error turns TensorBoard logging off with a warning, and training goes on."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            log.warning("TensorBoard logging stopped: %s: %s", type(error).__name__, error)
            self.writer = None
    return guarded


class TensorBoardLog(TrainingObserver):
    def __init__(self, writer_class, log_dir: Path, device):
        self.writer_class, self.log_dir, self.device = writer_class, Path(log_dir), device
        self.writer = None
        self._ema_sum = 0.0
        self._ema_weight = 0.0

    @_never_fails
    def on_start(self, info):
        # Opened here, not earlier, to know the start step: on resume, purge_step hides the events
        # a crashed run wrote after its last checkpoint, so the curves do not double back.
        purge = info["start_step"] + 1 if info["resumed"] else None
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)
        log.info("TensorBoard events: %s", self.log_dir)

    @_never_fails
    def on_step(self, report):
        if self.writer is None:
            return
        step, add = report.step, self.writer.add_scalar
        add("loss/raw", report.loss, step)
        add("loss/ema", self._smoothed(report.loss), step)
        add("lr", report.lr, step)
        if report.grad_norm is not None:
            add("grad_norm", report.grad_norm, step)
        add("speed/samples_per_s", report.samples / max(report.seconds, 1e-9), step)
        for name, value in system.device_memory(self.device).items():
            if value is not None:
                add(f"memory/{name}_mib", value / system.MIB, step)

    def _smoothed(self, loss: float) -> float:
        """Exponential moving average from 0, divided by the weight it has gathered so far (bias
        correction): the first steps show the real loss level instead of a ramp up from 0."""
        self._ema_sum = EMA_DECAY * self._ema_sum + (1 - EMA_DECAY) * loss
        self._ema_weight = EMA_DECAY * self._ema_weight + (1 - EMA_DECAY)
        return self._ema_sum / self._ema_weight

    @_never_fails
    def on_preview(self, step, paths):
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for i, path in enumerate(paths):
            if str(path).endswith(".txt"):   # a causal-LM preview: generated text
                self.writer.add_text(f"preview/{i:02d}", Path(path).read_text(encoding="utf-8"), step)
                continue
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except OSError as error:
                log.warning("preview %s not added to TensorBoard: %s", path, error)
                continue
            self.writer.add_image(f"preview/{i:02d}", pixels, step, dataformats="HWC")
        self.writer.flush()

    @_never_fails
    def on_checkpoint(self, step, path):
        if self.writer is not None:
            self.writer.flush()

    def on_end(self, result):
        self.close()

    @_never_fails
    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
