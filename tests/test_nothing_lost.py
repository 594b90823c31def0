"""Nothing a user has is lost, and what would be is found before the model loads: someone else's
LoRA of the same name, unwritable folders, two runs on one run folder, a failed LoRA write, a
deleted LoRA, damaged checkpoints, temp files of killed runs, a closed terminal."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.storage import run_lock
from lora_trainer.storage.checkpoints import CheckpointStore
from lora_trainer.training import outputs
from lora_trainer.training.control import TrainingControl, TrainingObserver
from lora_trainer.training.outputs import (RUN_ID_KEY, LoraWriteFailed, OutputConflict, OutputNotWritable,
                                           preflight)
from lora_trainer.app.session import train_from_config

from test_resume import StopAt, run_fault

QUICK = dict(epochs=1, save_steps=2, write_card=False)   # 6 steps


def train(cfg_path, observers=(), **overrides):
    control = TrainingControl()
    observers = [factory(control) for factory in observers]
    return train_from_config(load_config(cfg_path, overrides), control, observers)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the (slow) model load is reached: the check must come before it."""
    from lora_trainer.backbones import diffusers_sd

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(diffusers_sd, "load_backbone", refuse)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# ---- someone else's LoRA -------------------------------------------------------------------------

def test_a_lora_this_run_did_not_write_stops_the_run_before_the_model_loads(make_config, no_model_load):
    cfg = load_config(make_config(**QUICK))
    theirs = Path(cfg.output_dir) / "test_lora.safetensors"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone's download")
    with pytest.raises(OutputConflict, match="overwrite_output") as error:
        train_from_config(cfg)
    assert str(theirs) in str(error.value)
    assert theirs.read_bytes() == b"someone's download"


def test_overwrite_output_keeps_the_old_file_and_its_card_outside_the_lora_folder(make_config):
    cfg_path = make_config(**QUICK)
    cfg = load_config(cfg_path)
    lora_dir = Path(cfg.output_dir)
    lora_dir.mkdir(parents=True)
    (lora_dir / "test_lora.safetensors").write_bytes(b"an older good LoRA")
    (lora_dir / "test_lora.json").write_text('{"notes": "mine"}')
    result = train(cfg_path, overwrite_output=True)
    replaced = sorted(p.name for p in (result.run_dir / "replaced").iterdir())
    assert len(replaced) == 2 and replaced[0].startswith("test_lora.bak-")
    backup = result.run_dir / "replaced" / replaced[1]
    assert backup.suffix == ".safetensors" and backup.read_bytes() == b"an older good LoRA"
    assert not any(p.name.startswith("test_lora.bak") for p in lora_dir.iterdir())
    assert read_lora_file(result.lora_path)[1][RUN_ID_KEY] == json.loads(
        (result.run_dir / "run.json").read_text())["run_id"]


def test_the_runs_own_lora_and_its_earlier_runs_lora_are_not_someone_elses(make_config):
    cfg_path = make_config(**QUICK)
    first = train(cfg_path)
    assert train(cfg_path).status == "already_finished"          # its own file: no conflict
    again = train(cfg_path, resume=False)                        # started over: the old LoRA is kept
    assert again.status == "finished"
    assert [p.suffix for p in (again.run_dir / "replaced").iterdir()] == [".safetensors"]
    assert first.lora_path == again.lora_path


# ---- folders -------------------------------------------------------------------------------------

def test_an_output_dir_that_is_a_file_is_found_before_the_model_loads(make_config, tmp_path, no_model_load):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritable, match="output_dir.*not a folder"):
        train(make_config(output_dir=str(blocker / "lora"), **QUICK))


def test_an_unwritable_run_dir_is_found_before_the_model_loads(make_config, monkeypatch, no_model_load):
    real = outputs.write_file_synced

    def read_only(path, data):
        if "runs" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)
    monkeypatch.setattr(outputs, "write_file_synced", read_only)
    with pytest.raises(OutputNotWritable, match="run_dir: cannot write into .*Permission denied"):
        train(make_config(**QUICK))


# ---- one run per run folder ----------------------------------------------------------------------

def test_a_second_run_on_a_run_folder_is_refused_with_the_holders_pid(make_config, no_model_load):
    cfg = load_config(make_config(**QUICK))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run_lock.lock_path(cfg.run_dir)
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": 0}))
        with pytest.raises(run_lock.RunFolderLocked, match=f"pid {holder.pid}"):
            train_from_config(cfg)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_a_second_thread_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    lock = run_lock.lock_path(run_dir)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": 0}))
    refused = []
    with run_lock.hold_run_folder(run_dir):
        with run_lock.hold_run_folder(run_dir):      # re-entrant in the same thread
            assert json.loads(lock.read_text())["pid"] == os.getpid()

        def second():
            try:
                run_lock.acquire(run_dir)
            except run_lock.RunFolderLocked as error:
                refused.append(str(error))
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert lock.exists()
    assert refused and f"pid {os.getpid()}" in refused[0]
    assert not lock.exists()


# ---- saving order and re-export -------------------------------------------------------------------

def test_a_failed_lora_write_loses_no_steps_and_the_resume_writes_the_lora(make_config, monkeypatch):
    from lora_trainer.tasks.sd import training as trainer_mod

    cfg_path = make_config(**QUICK)
    real = trainer_mod.save_lora_file
    calls = {"n": 0}

    def fails_second_time(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] == 2:     # the save at step 4
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, tensors, metadata)
    monkeypatch.setattr(trainer_mod, "save_lora_file", fails_second_time)
    with pytest.raises(LoraWriteFailed, match="checkpoint-00000004"):
        train(cfg_path)
    run_dir = Path(load_config(cfg_path).run_dir)
    assert CheckpointStore(run_dir).latest_valid()[0].step == 4       # the steps are kept
    monkeypatch.setattr(trainer_mod, "save_lora_file", real)
    stopped = train(cfg_path, observers=[lambda control: StopAt(control, 5)])
    assert "re-exported it from the checkpoint of step 4" in (run_dir / "logs" / "train.log").read_text()
    assert stopped.step == 5 and read_lora_file(stopped.lora_path)[1]["ss_steps"] == "5"


def test_a_finished_run_whose_lora_was_deleted_exports_it_again(make_config):
    cfg_path = make_config(**QUICK)
    first = train(cfg_path)
    first.lora_path.unlink()
    again = train(cfg_path)
    assert again.status == "already_finished"
    assert read_lora_file(again.lora_path)[1]["ss_steps"] == "6"
    assert "is missing; re-exported" in (first.run_dir / "logs" / "train.log").read_text()


def test_damaged_checkpoints_are_said_and_the_old_lora_stays_until_the_first_save(make_config):
    cfg_path = make_config(**QUICK)
    first = train(cfg_path, observers=[lambda control: StopAt(control, 4)])
    for info in CheckpointStore(first.run_dir).list():
        (info.path / "state.json").write_text("{broken")
    before = first.lora_path.read_bytes()
    seen = {}

    class LoraAtFirstStep(TrainingObserver):
        def __init__(self, control):
            pass

        def on_step(self, report):
            if report.step == 1:
                seen["lora"] = first.lora_path.read_bytes()
    result = train(cfg_path, observers=[LoraAtFirstStep])
    assert seen["lora"] == before and result.status == "finished" and result.step == 6
    assert "is damaged" in (first.run_dir / "logs" / "train.log").read_text()


# ---- leftovers and signals -------------------------------------------------------------------------

def test_temp_files_of_killed_runs_are_removed_and_nothing_else(make_config, tmp_path):
    cfg = load_config(make_config(cache_dir=str(tmp_path / "cache"), **QUICK))
    lora_dir, shard = Path(cfg.output_dir), tmp_path / "cache" / "latents" / "ab"
    lora_dir.mkdir(parents=True)
    shard.mkdir(parents=True)
    dead, alive = dead_pid(), os.getppid()
    stale = [lora_dir / f".test_lora.safetensors.{dead}-0123abcd.tmp", shard / f".ab12.safetensors.{dead}-89abcdef.tmp"]
    kept = [lora_dir / f".other.safetensors.{alive}-0123abcd.tmp", lora_dir / ".notes.tmp",
            lora_dir / "keep.safetensors"]
    for path in stale + kept:
        path.write_bytes(b"x")
    preflight(cfg)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_sighup_stops_cleanly_with_a_checkpoint(make_config):
    cfg = make_config(**QUICK)
    proc = run_fault(cfg, "--sigint-at-step", 3, "--signal", "SIGHUP", expect_rc=130)
    assert "Resume with: lora-trainer train --config" in proc.stdout
    assert CheckpointStore(Path(load_config(cfg).run_dir)).latest_valid()[0].step == 3
