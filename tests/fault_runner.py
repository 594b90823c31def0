"""Runs `lora-trainer train` in a real subprocess and kills it at a chosen point, with a real signal.

    python tests/fault_runner.py CONFIG [--kill-at-micro N] [--kill-in-save N] [--sigint-at-step N]

--kill-at-micro N   SIGKILL at the start of the N-th forward/backward of this process (so with
                    gradient accumulation, possibly in the middle of an optimizer step)
--kill-in-save N    SIGKILL halfway through writing a file of the N-th checkpoint this process saves
--sigint-at-step N  SIGINT (as Ctrl+C) after optimizer step N completes: must save and exit cleanly
--signal NAME       send this signal instead of SIGINT (e.g. SIGHUP: a closed terminal)
--only-rank R       under torchrun, only rank R injects the fault
Not a test module: tests/test_resume.py drives it.
"""
import argparse
import os
import signal
import sys

from lora_trainer import cli
from lora_trainer.storage import checkpoints
from lora_trainer.training import trainer as trainer_mod
from lora_trainer.training.control import TrainingObserver


def kill_at_micro(n):
    original = trainer_mod.Trainer._forward_backward
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    trainer_mod.Trainer._forward_backward = patched


def kill_in_save(n):
    original_save = checkpoints.CheckpointStore.save
    original_write = checkpoints.write_file_synced
    saves = {"n": 0}

    def save(self, *args, **kwargs):
        saves["n"] += 1
        return original_save(self, *args, **kwargs)

    def write(path, data):
        if saves["n"] == n:
            with open(path, "wb") as f:   # half a file on disk, then die
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, data)
    checkpoints.CheckpointStore.save = save
    checkpoints.write_file_synced = write


def sigint_at_step(n, signum=signal.SIGINT):
    class SendSigint(TrainingObserver):
        def on_step(self, report):
            if report.step == n:
                os.kill(os.getpid(), signum)

    from lora_trainer.monitor import console
    original_init = console.ConsoleProgress.__init__

    # ride along with the console observer, which the CLI always installs
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._sigint = SendSigint()
    original_on_step = console.ConsoleProgress.on_step

    def on_step(self, report):
        original_on_step(self, report)
        self._sigint.on_step(report)
    console.ConsoleProgress.__init__ = init
    console.ConsoleProgress.on_step = on_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--kill-at-micro", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--sigint-at-step", type=int)
    p.add_argument("--signal", default="SIGINT")
    p.add_argument("--only-rank", type=int, help="under torchrun: inject the fault on this rank only")
    a = p.parse_args()
    if a.only_rank is not None and int(os.environ.get("RANK", "0")) != a.only_rank:
        a.kill_at_micro = a.kill_in_save = a.sigint_at_step = None
    if a.kill_at_micro:
        kill_at_micro(a.kill_at_micro)
    if a.kill_in_save:
        kill_in_save(a.kill_in_save)
    if a.sigint_at_step:
        sigint_at_step(a.sigint_at_step, signal.Signals[a.signal])
    return cli.main(["train", "--config", a.config, "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
