"""How the outside world talks to a running training loop (signals, the UI's buttons) and listens
to it (progress bars, logs, the UI's live view)."""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field


class TrainingControl:
    """Requests are only acted on between optimizer steps, so every checkpoint sits on a step
    boundary (no half-accumulated gradients to save) and a stop is always clean."""

    def __init__(self):
        self.stop = threading.Event()
        self.save_now = threading.Event()
        self.preview_now = threading.Event()
        self.stop_reason = ""

    def request_stop(self, reason: str = "stop requested") -> None:
        self.stop_reason = reason
        self.stop.set()


def install_signal_handlers(control: TrainingControl):
    """First SIGINT/SIGTERM/SIGHUP (a closed terminal or ssh session): finish the current step,
    checkpoint, exit. A second SIGINT aborts."""
    previous = {}

    def on_signal(signum, frame):
        if control.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        control.request_stop(f"received {signal.Signals(signum).name}")

    # SIGHUP does not exist on Windows
    for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
        previous[sig] = signal.signal(sig, on_signal)

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore


@dataclass
class StepReport:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float | None
    seconds: float            # wall time of this step
    samples: int              # samples consumed by this step
    extra: dict = field(default_factory=dict)


class TrainingObserver:
    """Override what you need; the trainer calls these from its own thread."""

    def on_start(self, info: dict) -> None: ...
    def on_step(self, report: StepReport) -> None: ...
    def on_checkpoint(self, step: int, path) -> None: ...
    def on_lora_saved(self, path) -> None: ...
    def on_preview(self, step: int, paths: list) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_end(self, result) -> None: ...


class ObserverGroup(TrainingObserver):
    def __init__(self, observers):
        self.observers = list(observers)

    def __getattribute__(self, name):
        if name.startswith("on_"):
            def fan_out(*args, **kwargs):
                for o in object.__getattribute__(self, "observers"):
                    getattr(o, name)(*args, **kwargs)
            return fan_out
        return object.__getattribute__(self, name)
