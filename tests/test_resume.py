"""Crash-safe checkpoints and bit-identical resume.

The run used here: 6 images x 2 repeats = 12 samples, batch 2 -> 6 batches per epoch,
gradient accumulation 2 -> 3 optimizer steps per epoch, 3 epochs -> 9 steps, a checkpoint every
2 steps. So checkpoints land mid-epoch (2, 4, 8) and on an epoch boundary (6), and each optimizer
step has two micro-batches (a kill on an odd micro-batch is a kill mid-accumulation).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.storage.atomic import DiskFullError
from lora_trainer.storage.checkpoints import CheckpointStore
from lora_trainer.training.control import TrainingControl, TrainingObserver
from lora_trainer.training.resume import ResumeRefused
from lora_trainer.app.session import train_from_config

RUN = dict(gradient_accumulation_steps=2, epochs=3, save_steps=2, learning_rate=5e-3,
           lr_scheduler="cosine", lr_warmup_steps=2, keep_last_n_checkpoints=10)
FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")


class StopAt(TrainingObserver):
    def __init__(self, control, step):
        self.control, self.step = control, step

    def on_step(self, report):
        if report.step == self.step:
            self.control.request_stop("test stop")


def train(cfg_path, stop_at=None, force_resume=False, **overrides):
    control = TrainingControl()
    observers = [StopAt(control, stop_at)] if stop_at else []
    return train_from_config(load_config(cfg_path, overrides), control, observers, force_resume)


def final_state(result):
    """The LoRA tensors and the final checkpoint's tensors (LoRA + optimizer state)."""
    lora, meta = read_lora_file(result.lora_path)
    store = CheckpointStore(result.run_dir)
    info, _ = store.latest_valid()
    tensors, state = store.load(info)
    return lora, meta, tensors, state


def assert_identical(a, b):
    lora_a, meta_a, ckpt_a, state_a = a
    lora_b, meta_b, ckpt_b, state_b = b
    assert lora_a.keys() == lora_b.keys()
    for k in lora_a:
        assert torch.equal(lora_a[k], lora_b[k]), k
    # the addnet hash covers exactly the tensor bytes of the file
    assert meta_a["sshs_model_hash"] == meta_b["sshs_model_hash"]
    for part in ("lora", "optimizer"):
        assert ckpt_a[part].keys() == ckpt_b[part].keys()
        for k in ckpt_a[part]:
            assert torch.equal(ckpt_a[part][k], ckpt_b[part][k]), (part, k)
    assert state_a["position"] == state_b["position"]
    assert state_a["scheduler"] == state_b["scheduler"]


def finished_reference(folder, tiny_sd1, shapes_dataset, **values):
    """final_state of an uninterrupted 9-step run of `values` (RUN's schedule)."""
    from support import write_config

    cfg = write_config(folder, train_data_dir=shapes_dataset, base_model=tiny_sd1["single_file"], **values)
    result = train(cfg)
    assert result.status == "finished" and result.step == 9
    return final_state(result)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd1, shapes_dataset):
    return finished_reference(tmp_path_factory.mktemp("reference"), tiny_sd1, shapes_dataset, **RUN)


@pytest.mark.parametrize("stop_at", [1, 3, 5, 6])
def test_stop_and_resume_is_bit_identical(make_config, reference, stop_at):
    cfg = make_config(**RUN)
    stopped = train(cfg, stop_at=stop_at)
    assert stopped.status == "stopped" and stopped.step == stop_at
    resumed = train(cfg)
    assert resumed.status == "finished"
    assert_identical(final_state(resumed), reference)


def run_fault(cfg, *args, expect_rc=None):
    env = dict(os.environ, PYTHONPATH=str(FAULT_RUNNER.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(FAULT_RUNNER), str(cfg), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    return proc


def test_sigkill_mid_accumulation_and_during_saves_then_resume_is_bit_identical(make_config, reference):
    cfg = make_config(**RUN)
    run_dir = Path(load_config(cfg).run_dir)
    # 1: killed in the first micro-batch of step 4 (mid-accumulation) -> resumes from step 2
    run_fault(cfg, "--kill-at-micro", 7, expect_rc=-signal.SIGKILL)
    assert [i.step for i in CheckpointStore(run_dir).list()] == [2]
    # 2: resumed at 2, killed half-way through writing checkpoint 6 (its 2nd save: 4, 6)
    run_fault(cfg, "--kill-in-save", 2, expect_rc=-signal.SIGKILL)
    store = CheckpointStore(run_dir)
    assert store.latest_valid()[0].step == 4
    assert any(p.name.startswith(".tmp-") for p in store.checkpoints_dir.iterdir())
    # 3: resumed at 4, killed mid-accumulation of step 7 (just after an epoch boundary)
    run_fault(cfg, "--kill-at-micro", 5, expect_rc=-signal.SIGKILL)
    # 4: runs to the end
    proc = run_fault(cfg, expect_rc=0)
    assert "Resuming from step 6 of 9" in proc.stdout
    assert not any(p.name.startswith(".tmp-") for p in store.checkpoints_dir.iterdir())
    assert_identical(final_state(train(cfg)), reference)   # (already finished: just reads)


def test_sigint_saves_prints_the_resume_command_and_resumes_exactly(make_config, reference):
    cfg = make_config(**RUN)
    proc = run_fault(cfg, "--sigint-at-step", 3, expect_rc=130)
    assert "Resume with: lora-trainer train --config" in proc.stdout
    assert CheckpointStore(Path(load_config(cfg).run_dir)).latest_valid()[0].step == 3
    assert_identical(final_state(train(cfg)), reference)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(make_config, reference, caplog):
    cfg = make_config(**RUN)
    stopped = train(cfg, stop_at=5)
    store = CheckpointStore(stopped.run_dir)
    newest = store.list()[-1]
    assert newest.step == 5
    victim = newest.path / "optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lora_trainer"):
        resumed = train(cfg)
    assert "checkpoint-00000005" in caplog.text
    assert resumed.status == "finished"
    assert_identical(final_state(resumed), reference)


def test_disk_full_during_a_save_stops_with_a_clear_message(make_config, monkeypatch):
    from lora_trainer.storage import checkpoints

    cfg = make_config(**RUN)
    original = checkpoints.write_file_synced

    def full_disk(path, data):
        if "checkpoint-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)
    monkeypatch.setattr(checkpoints, "write_file_synced", full_disk)
    with pytest.raises(DiskFullError) as err:
        train(cfg)
    message = str(err.value)
    assert "Disk full" in message and "checkpoint-00000002" in message
    store = CheckpointStore(Path(load_config(cfg).run_dir))
    assert store.latest_valid()[0].step == 2
    assert not any(p.name.startswith(".tmp-") for p in store.checkpoints_dir.iterdir())


def test_changed_config_is_refused_unless_forced(make_config):
    cfg = make_config(**RUN)
    train(cfg, stop_at=2)
    with pytest.raises(ResumeRefused, match=r"(?s)epochs: 3 -> 4.*--force-resume"):
        train(cfg, epochs=4)
    with pytest.raises(ResumeRefused, match=r"(?s)lora_rank.*--no-resume"):
        train(cfg, lora_rank=8, force_resume=True)
    # harmless changes need no force
    assert train(cfg, stop_at=4, save_steps=3).step == 4
    result = train(cfg, epochs=4, learning_rate=1e-3, force_resume=True)
    assert result.status == "finished" and result.step == 12


def test_changed_dataset_or_base_model_is_detected(make_config, tmp_path, shapes_dataset, tiny_sd1):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dataset, data)
    cfg = make_config(train_data_dir=data, **RUN)
    train(cfg, stop_at=2)
    caption = next(data.rglob("*.txt"))
    caption.write_text("something else entirely")
    with pytest.raises(ResumeRefused, match="dataset"):
        train(cfg)
    with pytest.raises(ResumeRefused, match="base model"):
        train(cfg, base_model=str(tiny_sd1["folder"]), force_resume=True)


def test_no_resume_starts_fresh_and_keeps_the_old_run(make_config):
    cfg = make_config(**RUN)
    first = train(cfg, stop_at=2)
    fresh = train(cfg, stop_at=1, resume=False)
    assert fresh.step == 1
    kept = [p for p in first.run_dir.parent.iterdir() if p.name.startswith(first.run_dir.name + "-old-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "checkpoint-00000002").is_dir()


def test_keep_last_n_and_checkpoints_command(make_config, capsys):
    from lora_trainer.cli import main as cli_main

    cfg = make_config(**{**RUN, "keep_last_n_checkpoints": 2, "save_steps": 1})
    result = train(cfg)
    assert [i.step for i in CheckpointStore(result.run_dir).list()] == [8, 9]
    assert cli_main(["checkpoints", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "       9" in out


def test_snapshots_land_next_to_the_lora_and_state_stays_out_of_it(make_config):
    result = train(make_config(**{**RUN, "save_snapshots": True}))
    lora_dir = result.lora_path.parent
    names = sorted(p.name for p in lora_dir.iterdir())
    assert names == ["test_lora-000002.safetensors", "test_lora-000004.safetensors",
                     "test_lora-000006.safetensors", "test_lora-000008.safetensors", "test_lora.json",
                     "test_lora.preview.png", "test_lora.safetensors"]   # the WebUI card (write_card)
    assert read_lora_file(lora_dir / "test_lora-000004.safetensors")[1]["ss_output_name"] == "test_lora-000004"
    assert not result.run_dir.is_relative_to(lora_dir)
