"""The WebUI's progress bar and Interrupt button, as a TrainingObserver.

The WebUI's progress endpoint (`/internal/progress`) reports `job_no / job_count` of
`shared.state` plus `textinfo`; its Interrupt button sets `shared.state.interrupted`. This observer
keeps `job_count` = total optimizer steps, `job_no` = steps done and `textinfo` = step, loss,
speed and ETA, and turns an Interrupt (or "Stop generating") into `control.request_stop`: the
trainer finishes the current step, writes a checkpoint and the LoRA, and returns "stopped" — the
run resumes from there next time.

The flags are polled whenever the trainer reports anything (every step, message, checkpoint and
preview), so a stop takes effect at the next step boundary.
"""
from __future__ import annotations

import time

from ..monitor.run_log import format_duration
from ..training.control import TrainingObserver

JOB_NAME = "train-lora"


class WebuiProgress(TrainingObserver):
    def __init__(self, control, state, clock=time.monotonic):
        self.control = control
        self.state = state
        self.clock = clock
        self.total = 0
        self.step = 0
        self.loss: float | None = None
        self._start_step = 0
        self._start_time: float | None = None
        self.stop_requested = False

    # ---- the WebUI's flags -----------------------------------------------------------------------
    def poll(self) -> bool:
        """Map the WebUI's Interrupt / Stop generating to a clean stop. True once a stop was asked."""
        state = self.state
        if not self.stop_requested and (getattr(state, "interrupted", False)
                                        or getattr(state, "stopping_generation", False)):
            self.stop_requested = True
            self.control.request_stop("interrupted from the WebUI")
            self._text(f"Stopping after step {self.step} of {self.total}: writing a checkpoint…")
        return self.stop_requested

    def _text(self, text: str) -> None:
        self.state.textinfo = text

    def _counters(self) -> None:
        self.state.job = JOB_NAME
        self.state.job_count = max(self.total, 1)
        self.state.job_no = self.step
        # the endpoint adds sampling_step / sampling_steps of one job: none while training
        self.state.sampling_step = 0
        self.state.sampling_steps = 0

    def eta_seconds(self) -> float | None:
        if self._start_time is None or self.step <= self._start_step:
            return None
        rate = (self.step - self._start_step) / max(self.clock() - self._start_time, 1e-9)
        return (self.total - self.step) / rate

    def status_line(self) -> str:
        parts = [f"Step {self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        eta = self.eta_seconds()
        if eta is not None:
            elapsed = self.clock() - self._start_time
            parts.append(f"{(self.step - self._start_step) / max(elapsed, 1e-9):.2f} it/s")
            parts.append(f"ETA {format_duration(eta)}")
        return " · ".join(parts)

    # ---- observer --------------------------------------------------------------------------------
    def on_start(self, info: dict) -> None:
        self.total = int(info["total_steps"])
        self.step = self._start_step = int(info["start_step"])
        self._start_time = self.clock()
        self._counters()
        verb = "Resuming" if info.get("resumed") else "Training"
        self._text(f"{verb} {info.get('lora_layers', '?')} LoRA layers: step {self.step}/{self.total}")
        self.poll()

    def on_step(self, report) -> None:
        self.step, self.total, self.loss = report.step, report.total_steps, report.loss
        self._counters()
        self._text(self.status_line())
        self.poll()

    def on_message(self, text: str) -> None:
        if not self.stop_requested:
            self._text(text)
        self.poll()

    def on_checkpoint(self, step, path) -> None:
        self.poll()

    def on_lora_saved(self, path) -> None:
        self.poll()

    def on_preview(self, step, paths) -> None:
        # a preview rendered through process_images moved job_no/job_count/textinfo: put them back
        self._counters()
        self._text(self.status_line())
        self.poll()

    def on_end(self, result) -> None:
        self.step = result.step
        self._counters()
        self._text(result.message)
