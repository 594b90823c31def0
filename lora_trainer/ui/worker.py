"""Training in a background thread, one run at a time, and the live state the page polls.

The gradio handlers never wait for training: Start hands the config to `TrainingWorker.start`
(which returns at once) and a periodic refresh reads `TrainingWorker.snapshot()`. The trainer
reports through the TrainingObserver events and a logging handler; everything it reports lands in
a `LiveState` behind a lock, with a version number that changes whenever something visible does,
so a page only redraws what changed.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..training.control import StepReport, TrainingControl, TrainingObserver

log = logging.getLogger("lora_trainer")

# trainer(cfg, control, observers, force_resume) -> TrainResult
TrainerFn = Callable[..., object]

ACTIVE_STATES = ("starting", "training", "stopping")
MAX_LOG_LINES = 400
MAX_PLOT_POINTS = 1000


def default_trainer(cfg, control, observers, force_resume=False):
    from ..app.session import train_from_config

    return train_from_config(cfg, control, observers, force_resume)


@dataclass
class Snapshot:
    """A consistent copy of the live state (what one refresh of the page shows)."""
    version: int
    runs_version: int
    status: str                       # idle|starting|training|stopping|finished|stopped|error
    step: int
    total_steps: int
    start_step: int
    it_per_s: Optional[float]
    eta_s: Optional[float]
    elapsed_s: float
    loss: Optional[float]
    losses: list                      # [(step, loss)]
    previews: list                    # [(path, caption)]
    preview_step: Optional[int]
    log_lines: list
    message: str
    error: str
    lora_path: Optional[str]
    output_name: Optional[str]
    run_dir: Optional[str]
    last_checkpoint_step: Optional[int]
    has_previews: bool
    ended_wall: Optional[float] = None   # time.time() when the run ended: the page refreshes the
                                         # WebUI's Lora cards once for every end it has not seen

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES


@dataclass
class _State:
    version: int = 0
    runs_version: int = 0
    status: str = "idle"
    step: int = 0
    total_steps: int = 0
    start_step: int = 0
    started_at: float = 0.0
    ended_at: Optional[float] = None
    ended_wall: Optional[float] = None
    loss: Optional[float] = None
    losses: list = field(default_factory=list)
    step_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))
    previews: list = field(default_factory=list)
    preview_step: Optional[int] = None
    log_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_LOG_LINES))
    message: str = ""
    error: str = ""
    lora_path: Optional[str] = None
    output_name: Optional[str] = None
    run_dir: Optional[str] = None
    last_checkpoint_step: Optional[int] = None
    has_previews: bool = False


class _LogCapture(logging.Handler):
    """The trainer's log lines (message only, never a stack) for the page's log tail: what the
    console shows, plus the periodic step lines; not the train.log-only records (the effective
    config, environment, "event …" lines)."""

    def __init__(self, worker: "TrainingWorker"):
        super().__init__(level=logging.INFO)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False) and not getattr(record, "progress_line", False):
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not break training
            text = str(record.msg)
        prefix = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
        self.worker._add_log(prefix + text)


class _LiveObserver(TrainingObserver):
    def __init__(self, worker: "TrainingWorker"):
        self.worker = worker

    def on_start(self, info: dict) -> None:
        with self.worker._changing() as s:
            s.status = "stopping" if self.worker.control_stop_requested() else "training"
            s.total_steps = int(info.get("total_steps") or 0)
            s.start_step = s.step = int(info.get("start_step") or 0)
            s.run_dir = info.get("run_dir") or s.run_dir
            s.lora_path = info.get("lora_path") or s.lora_path
            s.step_times.clear()
            s.step_times.append((time.monotonic(), s.step))

    def on_step(self, report: StepReport) -> None:
        with self.worker._changing() as s:
            s.step = report.step
            s.total_steps = report.total_steps or s.total_steps
            s.loss = float(report.loss)
            s.losses.append((report.step, float(report.loss)))
            s.step_times.append((time.monotonic(), report.step))

    def on_checkpoint(self, step: int, path) -> None:
        with self.worker._changing() as s:
            s.last_checkpoint_step = step
            s.runs_version += 1

    def on_lora_saved(self, path) -> None:
        with self.worker._changing() as s:
            if s.output_name and Path(path).stem == s.output_name:
                s.lora_path = str(path)

    def on_preview(self, step: int, paths: list) -> None:
        with self.worker._changing() as s:
            s.previews = [(str(p), f"step {step}") for p in paths]
            s.preview_step = step

    def on_message(self, text: str) -> None:
        # Trainer.say() both logs and reports; the log handler already has the line
        with self.worker._lock:
            if text not in list(self.worker._state.log_lines)[-5:]:
                self.worker._add_log(text)

    def on_end(self, result) -> None:
        pass  # the worker thread records the result when the trainer returns


class TrainingWorker:
    """Owns at most one training thread. Thread-safe; shared by every page of the process."""

    def __init__(self, trainer: Optional[TrainerFn] = None):
        self.trainer = trainer or default_trainer
        self._lock = threading.RLock()
        self._state = _State()
        self._thread: Optional[threading.Thread] = None
        self._control: Optional[TrainingControl] = None

    # ---- state ----------------------------------------------------------------------------------
    class _Change:
        def __init__(self, worker):
            self.worker = worker

        def __enter__(self):
            self.worker._lock.acquire()
            return self.worker._state

        def __exit__(self, *exc):
            self.worker._state.version += 1
            self.worker._lock.release()
            return False

    def _changing(self) -> "_Change":
        return TrainingWorker._Change(self)

    def _add_log(self, text: str) -> None:
        with self._changing() as s:
            for line in str(text).splitlines() or [""]:
                s.log_lines.append(line)

    def control_stop_requested(self) -> bool:
        return bool(self._control and self._control.stop.is_set())

    @property
    def active(self) -> bool:
        with self._lock:
            return self._state.status in ACTIVE_STATES

    def snapshot(self) -> Snapshot:
        with self._lock:
            s = self._state
            now = time.monotonic()
            it_per_s = eta = None
            if len(s.step_times) >= 2:
                (t0, k0), (t1, k1) = s.step_times[0], s.step_times[-1]
                if t1 > t0 and k1 > k0:
                    it_per_s = (k1 - k0) / (t1 - t0)
            if it_per_s and s.total_steps and s.status in ACTIVE_STATES:
                eta = max(0.0, (s.total_steps - s.step) / it_per_s)
            end = s.ended_at if s.ended_at is not None else (now if s.started_at else 0.0)
            return Snapshot(
                version=s.version, runs_version=s.runs_version, status=s.status, step=s.step,
                total_steps=s.total_steps, start_step=s.start_step, it_per_s=it_per_s, eta_s=eta,
                elapsed_s=max(0.0, end - s.started_at) if s.started_at else 0.0, loss=s.loss,
                losses=_thin(s.losses, MAX_PLOT_POINTS), previews=list(s.previews),
                preview_step=s.preview_step, log_lines=list(s.log_lines), message=s.message,
                error=s.error, lora_path=s.lora_path, output_name=s.output_name, run_dir=s.run_dir,
                last_checkpoint_step=s.last_checkpoint_step, has_previews=s.has_previews,
                ended_wall=s.ended_wall)

    # ---- commands -------------------------------------------------------------------------------
    def start(self, cfg, force_resume: bool = False) -> tuple[bool, str]:
        """Start training `cfg` in the background. (False, why) when a run is already active."""
        with self._lock:
            if self._state.status in ACTIVE_STATES:
                s = self._state
                where = f" (step {s.step}/{s.total_steps})" if s.total_steps else ""
                return False, (f"A training run is already active{where}: {s.output_name or ''} in "
                               f"{s.run_dir or '?'}. Stop it first; only one run at a time.")
            control = TrainingControl()
            self._control = control
            with self._changing() as s:
                runs_version = s.runs_version + 1
                self._state = s = _State(version=s.version, runs_version=runs_version)
                s.status = "starting"
                s.started_at = time.monotonic()
                s.output_name = cfg.output_name
                s.run_dir = str(cfg.run_dir)
                s.lora_path = str(Path(cfg.output_dir) / f"{cfg.output_name}.safetensors")
                s.has_previews = bool(getattr(cfg, "preview_prompts", None))
                s.log_lines.append(f"Starting {cfg.output_name}: run folder {cfg.run_dir}")
            self._thread = threading.Thread(target=self._run, args=(cfg, control, force_resume),
                                            name="lora-trainer-ui", daemon=True)
            self._thread.start()
        return True, f"Training started: {cfg.output_name} (run folder {cfg.run_dir})."

    def _run(self, cfg, control: TrainingControl, force_resume: bool) -> None:
        logger = logging.getLogger("lora_trainer")
        capture = _LogCapture(self)
        logger.addHandler(capture)
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            result = self.trainer(cfg, control, [_LiveObserver(self)], force_resume)
        except BaseException as error:  # noqa: BLE001 - shown on the page, stack in the log
            message = _describe_error(error)
            log.error("Training failed: %s", message, exc_info=True)  # stack: console + log files
            with self._changing() as s:
                s.status, s.error, s.message = "error", message, f"Training failed: {message}"
                s.ended_at, s.ended_wall = time.monotonic(), time.time()
                s.runs_version += 1
            if not isinstance(error, Exception):
                raise
        else:
            with self._changing() as s:
                status = getattr(result, "status", "finished")
                s.status = "finished" if status in ("finished", "already_finished") else "stopped"
                s.message = getattr(result, "message", "") or s.message
                s.step = getattr(result, "step", s.step)
                s.total_steps = getattr(result, "total_steps", s.total_steps) or s.total_steps
                lora = getattr(result, "lora_path", None)
                if lora is not None:
                    s.lora_path = str(lora)
                s.ended_at, s.ended_wall = time.monotonic(), time.time()
                s.runs_version += 1
        finally:
            logger.removeHandler(capture)
            logger.setLevel(old_level)

    def stop(self) -> bool:
        with self._lock:
            if self._state.status not in ACTIVE_STATES or self._control is None:
                return False
            self._control.request_stop("stopped from the UI")
            with self._changing() as s:
                s.status = "stopping"
            return True

    def save_now(self) -> bool:
        with self._lock:
            if self._state.status not in ACTIVE_STATES or self._control is None:
                return False
            self._control.save_now.set()
            return True

    def preview_now(self) -> bool:
        with self._lock:
            if self._state.status not in ACTIVE_STATES or self._control is None:
                return False
            self._control.preview_now.set()
            return True

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the training thread; True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True


def _describe_error(error: BaseException) -> str:
    text = str(error).strip()
    name = type(error).__name__
    if not text:
        return name
    # ConfigError / DataError messages are written for users already
    if name in ("ConfigError", "DataError", "CannotTrain", "OutOfMemoryStop"):
        return text
    return f"{name}: {text}"


def _thin(points: list, limit: int) -> list:
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    thinned = points[::stride]
    if thinned[-1] != points[-1]:
        thinned.append(points[-1])
    return thinned


_default_worker: Optional[TrainingWorker] = None
_default_lock = threading.Lock()


def default_worker() -> TrainingWorker:
    """The process-wide worker of the standalone app (one run at a time across all pages)."""
    global _default_worker
    with _default_lock:
        if _default_worker is None:
            _default_worker = TrainingWorker()
        return _default_worker


__all__ = ["Snapshot", "TrainingWorker", "default_trainer", "default_worker"]
