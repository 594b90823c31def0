"""The out-of-memory ladder, driven on the CPU by a backbone whose `predict` runs out of memory
on demand: halve the micro-batch without losing the step, then gradient checkpointing, then a stop
that says what is left to change."""
from __future__ import annotations

import gc
import itertools
import weakref
from pathlib import Path

import pytest
import torch

from lora_trainer.backbones.diffusers_sd import DiffusersBackbone
from lora_trainer.config import load_config
from lora_trainer.data.discovery import discover
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.training import oom
from lora_trainer.training.control import TrainingObserver
from lora_trainer.training.samples import SampleSource
from lora_trainer.app.session import train_from_config

REAL_PREDICT = DiffusersBackbone.predict


class StepSamples(TrainingObserver):
    """(epoch, position in epoch) of every sample each optimizer step trained on, and the size of
    every micro-batch that reached the model. An attempt that ran out of memory is forgotten: the
    trainer retries the whole step."""

    def __init__(self, monkeypatch):
        self.current, self.steps, self.step_numbers, self.micro_batches = [], [], [], []
        real_batch = SampleSource.batch

        def recording_batch(source, epoch, items):
            self.current += [(epoch, position) for position, _ in items]
            return real_batch(source, epoch, items)
        monkeypatch.setattr(SampleSource, "batch", recording_batch)

    def failed_attempt(self):
        self.current = []

    def on_step(self, report):
        self.steps.append(self.current)
        self.step_numbers.append(report.step)
        self.current = []


def run_out_of_memory(monkeypatch, should_fail, error, recorder=None):
    """`predict` raises `error` whenever should_fail(micro-batch size) says so."""
    def predict(backbone, noisy, timesteps, cond):
        if should_fail(noisy.shape[0]):
            if recorder:
                recorder.failed_attempt()
            raise error
        if recorder:
            recorder.micro_batches.append(noisy.shape[0])
        return REAL_PREDICT(backbone, noisy, timesteps, cond)
    monkeypatch.setattr(DiffusersBackbone, "predict", predict)


def largest_relative_difference(a: dict, b: dict) -> float:
    """Largest |a - b| of any tensor, relative to that tensor's largest value."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def overall_relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |b| over all tensors together (L2)."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return (num / sum(float(b[k].pow(2).sum()) for k in a)) ** 0.5


def train_log(cfg) -> str:
    return (Path(cfg.run_dir) / "logs" / "train.log").read_text(encoding="utf-8")


def train_recording(make_config, monkeypatch, name, should_fail, **values):
    values.setdefault("write_card", False)    # no card thumbnail render: only training's predicts
    cfg = load_config(make_config(name, epochs=1, max_train_steps=3, tensorboard=False, **values))
    seen = StepSamples(monkeypatch)
    run_out_of_memory(monkeypatch, should_fail, torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                       "allocate 2.00 GiB"), seen)
    result = train_from_config(cfg, observers=[seen])
    assert result.status == "finished"
    return read_lora_file(result.lora_path)[0], seen, train_log(cfg)


def oom_when_batched_from_step(step: int):
    """Runs out of memory on any micro-batch larger than 1 from optimizer step `step` on (with
    batch_size 2 and no accumulation, step k makes the k-th batched call)."""
    batched_calls = itertools.count(1)
    return lambda size: size > 1 and next(batched_calls) >= step


def test_oom_halves_the_micro_batch_and_matches_a_run_started_smaller(make_config, monkeypatch):
    # The comparison is only meaningful if all runs group the same samples into each step. With
    # one aspect bucket (square images) the epoch's batches are plain chunks of its permutation, so
    # 1 batch of 2 and 2 accumulated batches of 1 hold the same samples; `steps` below checks it.
    cfg = load_config(make_config("dataset_check"))
    assert {(r.width, r.height) for r in discover(cfg.train_data_dir).records} == {(64, 64)}

    small, seen_small, _ = train_recording(make_config, monkeypatch, "small", lambda size: False,
                                           batch_size=1, gradient_accumulation_steps=2)
    at_1, seen_1, log_1 = train_recording(make_config, monkeypatch, "oom_at_1",
                                          oom_when_batched_from_step(1), batch_size=2)
    at_2, seen_2, log_2 = train_recording(make_config, monkeypatch, "oom_at_2",
                                          oom_when_batched_from_step(2), batch_size=2)

    # no step lost or repeated; the step that ran out of memory was retried at micro-batch 1
    assert seen_small.step_numbers == seen_1.step_numbers == seen_2.step_numbers == [1, 2, 3]
    assert seen_small.micro_batches == seen_1.micro_batches == [1] * 6
    assert seen_2.micro_batches == [2, 1, 1, 1, 1]
    assert seen_small.steps == seen_1.steps == seen_2.steps     # the same samples, step by step
    assert all(len(step) == 2 for step in seen_small.steps)
    assert "Out of memory at step 1: micro-batch halved to 1" in log_1
    assert "Out of memory at step 2: micro-batch halved to 1 (gradient accumulation doubled; " \
           "effective batch unchanged). Retrying the step." in log_2

    # Halved from the first step, every forward/backward is the started-small run's: bit-identical.
    diff_1 = largest_relative_difference(at_1, small)
    # Halved at step 2, step 1 ran as one batch of 2 instead of two of 1: the float rounding of
    # a batched matmul differs (~1e-7), and Adam's first steps turn that into visibly different
    # updates for the few weights whose gradient is near its eps (1e-8). Over the whole LoRA the
    # difference stays far below 1e-5; weight by weight it is not meaningful.
    diff_2 = overall_relative_difference(at_2, small)
    print(f"\nOOM at step 1 vs started small: largest relative difference {diff_1:.3e}; "
          f"OOM at step 2: overall {diff_2:.3e}, largest {largest_relative_difference(at_2, small):.3e}")
    assert diff_1 <= 1e-5
    assert diff_2 <= 1e-5


def test_oom_at_micro_batch_one_enables_checkpointing_then_stops_with_the_levers(make_config, monkeypatch):
    cfg = load_config(make_config("stop", batch_size=2, epochs=1))
    run_out_of_memory(monkeypatch, lambda size: True, RuntimeError("CUDA out of memory"))
    checkpointing = []
    real_set = DiffusersBackbone.set_gradient_checkpointing
    monkeypatch.setattr(DiffusersBackbone, "set_gradient_checkpointing",
                        lambda self, on: (checkpointing.append(on), real_set(self, on))[1])

    with pytest.raises(oom.OutOfMemoryStop) as stop:
        train_from_config(cfg)

    assert checkpointing == [False, True]      # off per config, then switched on by the ladder
    message = str(stop.value)
    for lever in ("lower resolution (now 64)", "lower lora_rank (now 4)", "optimizer: adamw8bit",
                  "mixed_precision: fp16 or bf16"):
        assert lever in message, lever
    log_text = train_log(cfg)
    ladder = ["micro-batch halved to 1", "gradient checkpointing enabled", "OutOfMemoryStop"]
    positions = [log_text.index(entry) for entry in ladder]
    assert positions == sorted(positions)
    assert "Traceback" in log_text


def test_oom_in_the_optimizer_step_stops_with_the_levers_not_a_bare_error(make_config, monkeypatch):
    """AdamW allocates its state at the first step: no micro-batch split helps there."""
    from lora_trainer.training.trainer import Trainer

    def step(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    with pytest.raises(oom.OutOfMemoryStop) as stop:
        train_from_config(load_config(make_config("adam", max_train_steps=2, write_card=False)))
    message = str(stop.value)
    assert message.startswith("Out of memory in the optimizer step") and "lower lora_rank (now 4)" in message


def test_the_failed_attempt_is_freed_before_retrying(make_config, monkeypatch):
    """The exception's traceback holds the failed forward's frames; if they kept their tensors,
    empty_cache could not give the memory back and the retry would run out again."""
    held = []

    def predict(backbone, noisy, timesteps, cond):
        if noisy.shape[0] > 1:
            activations = torch.empty(1 << 16)   # what a real forward holds when it runs out
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return REAL_PREDICT(backbone, noisy, timesteps, cond)
    monkeypatch.setattr(DiffusersBackbone, "predict", predict)
    alive_when_freeing = []

    def spy_free(device):
        gc.collect()
        alive_when_freeing.append(held[-1]() is not None)
    monkeypatch.setattr(oom, "free_device_memory", spy_free)

    train_from_config(load_config(make_config("freed", batch_size=2, max_train_steps=1, write_card=False)))
    assert alive_when_freeing == [False]


@pytest.mark.parametrize("message, expected", [
    ("CUDA out of memory. Tried to allocate 20.00 MiB", True),
    ("MPS backend out of memory (MPS allocated: 1 GB)", True),
    ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 4096 bytes.", True),
    ("DefaultCPUAllocator: not enough memory: you tried to allocate 4096 bytes.", True),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_out_of_memory_is_recognised_by_its_message(message, expected):
    assert oom.is_out_of_memory(RuntimeError(message)) is expected
    assert oom.is_out_of_memory(oom.OutOfMemoryStop("Out of memory even at micro-batch 1")) is False


def test_oom_ladder_works_for_a_lycoris_type(make_config, monkeypatch):
    """The ladder knows nothing of adapter types: a LoHa + DoRA run halved from step 1 trains what a
    run started at micro-batch 1 trains."""
    lycoris = dict(adapter_type="loha", dora=True, lora_rank=2)
    small, _, _ = train_recording(make_config, monkeypatch, "small", lambda size: False, batch_size=1,
                                  gradient_accumulation_steps=2, **lycoris)
    halved, seen, log = train_recording(make_config, monkeypatch, "oom_at_1", oom_when_batched_from_step(1),
                                        batch_size=2, **lycoris)
    assert any(k.endswith(".hada_w1_a") for k in small) and any(k.endswith(".dora_scale") for k in small)
    assert seen.micro_batches == [1] * 6 and "micro-batch halved to 1" in log
    assert largest_relative_difference(halved, small) <= 1e-5


def test_oom_ladder_works_on_the_compiled_step(make_config, monkeypatch):
    """compile: true — the halved micro-batch is a new shape for the compiled step: it compiles
    again and the run goes on (graph capture with aot_eager here; see test_fast_path)."""
    compiled = dict(compile=True, compile_backend="aot_eager")
    halved, seen, log = train_recording(make_config, monkeypatch, "oom_at_2", oom_when_batched_from_step(2),
                                        batch_size=2, **compiled)
    assert seen.step_numbers == [1, 2, 3] and seen.micro_batches == [2, 1, 1, 1, 1]
    assert "Out of memory at step 2: micro-batch halved to 1" in log
    eager, _, _ = train_recording(make_config, monkeypatch, "eager", oom_when_batched_from_step(2), batch_size=2)
    assert overall_relative_difference(halved, eager) <= 1e-5
