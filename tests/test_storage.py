"""Crash-safety and exact-resume tests for lora_trainer.storage (fast, CPU only)."""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from lora_trainer.storage import atomic, checkpoints
from lora_trainer.storage.atomic import (DiskFullError, atomic_save_safetensors, atomic_write_bytes,
                                         atomic_write_json, atomic_write_text)
from lora_trainer.storage.checkpoints import CheckpointError, CheckpointStore
from lora_trainer.storage.train_state import (apply_determinism_settings, capture_rng_state,
                                              determinism_settings, grad_scaler_state_to_json,
                                              load_grad_scaler_state, load_optimizer_state,
                                              load_scheduler_state, optimizer_state_to_files,
                                              restore_rng_state, scheduler_state_to_json)

REPO_ROOT = Path(__file__).resolve().parents[1]


def hidden_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def temp_entries(store: CheckpointStore) -> list[Path]:
    return [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]


def lora_tensors(value: float) -> dict[str, torch.Tensor]:
    return {"down.weight": torch.full((4, 8), value), "up.weight": torch.full((8, 4), -value)}


def save_checkpoint(store: CheckpointStore, step: int, loss: float = 0.5) -> Path:
    return store.save(step, {"lora": lora_tensors(float(step)), "optimizer": {"x": torch.arange(5.0)}},
                      {"step": step, "loss": loss})


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- atomic writes ----------------------------------------------------------------------------

def test_atomic_writes_replace_content_and_leave_no_temp(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"old")
    atomic_write_bytes(tmp_path / "a.bin", b"new")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5]})
    atomic_save_safetensors(tmp_path / "d.safetensors", {"t": torch.arange(6.0).reshape(2, 3).t()},
                            metadata={"k": "v"})
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5]}
    loaded = safetensors.torch.load_file(str(tmp_path / "d.safetensors"))
    assert torch.equal(loaded["t"], torch.arange(6.0).reshape(2, 3).t())
    assert hidden_temp_files(tmp_path) == []


def test_temp_name_is_hidden_and_not_safetensors(tmp_path):
    name = atomic.temp_path_for(tmp_path / "lora.safetensors").name
    assert name.startswith(".") and name.endswith(".tmp") and not name.endswith(".safetensors")


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    atomic_write_bytes(target, b"previous")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 10_000)
    assert not isinstance(info.value, DiskFullError)
    assert target.read_bytes() == b"previous"
    assert hidden_temp_files(tmp_path) == []


def test_disk_full_write_raises_disk_full_error_naming_path(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(DiskFullError) as info:
        atomic_write_json(target, {"v": 2})
    message = str(info.value)
    assert str(target) in message and "disk is full" in message and "intact" in message
    assert info.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"v": 1}
    assert hidden_temp_files(tmp_path) == []


def test_unserialisable_json_does_not_touch_old_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}


# ---- checkpoint store ---------------------------------------------------------------------------

def test_save_load_list_round_trip(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save_checkpoint(store, 7, loss=0.25)
    assert path == tmp_path / "checkpoints" / "checkpoint-00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "lora.safetensors", "manifest.json", "optimizer.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["format_version"] == checkpoints.FORMAT_VERSION
    assert set(manifest["files"]) == {"lora.safetensors", "optimizer.safetensors", "state.json"}
    assert store.validate(path) is None

    [info] = store.list()
    assert (info.step, info.valid, info.problem, info.loss) == (7, True, None, 0.25)
    assert info.size_bytes == sum(p.stat().st_size for p in path.iterdir())
    assert abs(info.created - time.time()) < 60

    tensor_files, state = store.load(info)
    assert state == {"step": 7, "loss": 0.25}
    assert torch.equal(tensor_files["lora"]["down.weight"], lora_tensors(7.0)["down.weight"])
    assert torch.equal(tensor_files["optimizer"]["x"], torch.arange(5.0))
    assert temp_entries(store) == []


def test_manifest_is_written_last(tmp_path, monkeypatch):
    written = []
    real_write = checkpoints.write_file_synced

    def recording_write(path, data):
        written.append(Path(path).name)
        real_write(path, data)
    monkeypatch.setattr(checkpoints, "write_file_synced", recording_write)
    save_checkpoint(CheckpointStore(tmp_path), 1)
    assert written[-1] == "manifest.json" and len(written) == 4


def test_save_replaces_existing_same_step(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(3, {"lora": {"w": torch.zeros(2)}}, {"loss": 1.0})
    store.save(3, {"lora": {"w": torch.ones(2)}}, {"loss": 2.0})
    [info] = store.list()
    tensor_files, state = store.load(info)
    assert torch.equal(tensor_files["lora"]["w"], torch.ones(2)) and state["loss"] == 2.0
    assert temp_entries(store) == []


def test_rejects_reserved_or_unsafe_tensor_file_names(tmp_path):
    store = CheckpointStore(tmp_path)
    for bad in ("state", "manifest", "../evil", "a/b", ""):
        with pytest.raises(ValueError):
            store.save(1, {bad: {"w": torch.zeros(1)}}, {})


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    first = save_checkpoint(store, 1)
    real_write = checkpoints.write_file_synced
    calls = []

    def fill_disk_on_second_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(data[: len(data) // 2])  # a partial file, as a full disk leaves
            disk_full()
        real_write(path, data)
    monkeypatch.setattr(checkpoints, "write_file_synced", fill_disk_on_second_file)

    with pytest.raises(DiskFullError) as info:
        save_checkpoint(store, 2)
    message = str(info.value)
    assert str(tmp_path) in message and "checkpoint-00000001" in message and "isk full" in message
    latest, warnings = store.latest_valid()
    assert latest.path == first and warnings == []
    assert [i.step for i in store.list()] == [1]
    assert temp_entries(store) == []


def test_disk_full_with_no_previous_checkpoint_says_so(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    monkeypatch.setattr(checkpoints, "write_file_synced", disk_full)
    with pytest.raises(DiskFullError, match="no earlier valid checkpoint"):
        save_checkpoint(store, 1)
    assert temp_entries(store) == []


def corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])


def corrupt_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, expected", [(corrupt_truncate, "bytes"),
                                               (corrupt_flip_byte, "checksum mismatch")])
def test_corruption_is_detected_and_skipped_with_warning(tmp_path, corrupt, expected):
    store = CheckpointStore(tmp_path)
    save_checkpoint(store, 1)
    damaged = save_checkpoint(store, 2)
    corrupt(damaged / "lora.safetensors")

    problem = store.validate(damaged)
    assert problem is not None and expected in problem and "lora.safetensors" in problem
    latest, warnings = store.latest_valid()
    assert latest.step == 1
    assert len(warnings) == 1 and "checkpoint-00000002" in warnings[0] and expected in warnings[0]
    with pytest.raises(CheckpointError, match="lora.safetensors"):
        store.load(damaged)


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / "manifest.json").unlink(), "missing manifest.json"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "optimizer.safetensors").unlink(), "missing file optimizer.safetensors"),
])
def test_structural_problems_are_reported(tmp_path, damage, expected):
    store = CheckpointStore(tmp_path)
    path = save_checkpoint(store, 4)
    damage(path)
    assert expected in store.validate(path)
    [info] = store.list()
    assert not info.valid and expected in info.problem and info.loss is None
    assert store.latest_valid()[0] is None


def test_unparsable_state_json_is_reported(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save_checkpoint(store, 1)
    (path / "state.json").write_text("{oops")
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "state.json").read_bytes()  # a manifest that matches the broken file
    manifest["files"]["state.json"] = {"size": len(data), "sha256": checkpoints._sha256_hex(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "state.json is not valid JSON" in store.validate(path)


KILLED_SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from lora_trainer.storage import checkpoints

    run_dir = Path(sys.argv[1])
    store = checkpoints.CheckpointStore(run_dir)
    store.save(1, {"lora": {"w": torch.ones(64)}}, {"loss": 1.0})

    def slow_write(path, data):  # writes half a file, then hangs until the test kills us
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        (run_dir / "saving-step-2").write_text("now")
        time.sleep(120)

    checkpoints.write_file_synced = slow_write
    store.save(2, {"lora": {"w": torch.zeros(64)}}, {"loss": 0.5})
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(run_dir)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "saving-step-2").exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the saver never reached checkpoint 2"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    store = CheckpointStore(run_dir)
    latest, warnings = store.latest_valid()
    assert latest.step == 1 and warnings == []
    assert [i.step for i in store.list()] == [1]
    stale = temp_entries(store)
    assert [p.name for p in stale] == [f".tmp-checkpoint-00000002-{process.pid}"]
    assert store.cleanup_temp() == stale
    assert temp_entries(store) == []
    assert torch.equal(store.load(latest)[0]["lora"]["w"], torch.ones(64))


def test_cleanup_temp_spares_folders_of_running_processes(tmp_path):
    store = CheckpointStore(tmp_path)
    save_checkpoint(store, 1)
    live = store.checkpoints_dir / f".tmp-checkpoint-00000002-{os.getppid()}"
    live.mkdir()
    assert store.cleanup_temp() == []
    assert live.exists()


def test_prune_keeps_newest_valid_and_drops_old_invalid(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        save_checkpoint(store, step)
    corrupt_flip_byte(store.checkpoints_dir / "checkpoint-00000002" / "lora.safetensors")
    newer_invalid = store.checkpoints_dir / "checkpoint-00000006"
    newer_invalid.mkdir()  # e.g. a folder without manifest: kept for inspection

    deleted = store.prune(2)
    assert [p.name for p in deleted] == ["checkpoint-00000001", "checkpoint-00000002",
                                         "checkpoint-00000003"]
    assert [(i.step, i.valid) for i in store.list()] == [(4, True), (5, True), (6, False)]

    store.prune(0)  # never deletes the newest valid checkpoint
    assert [(i.step, i.valid) for i in store.list()] == [(5, True), (6, False)]
    assert temp_entries(store) == []


def test_prune_without_valid_checkpoint_deletes_nothing(tmp_path):
    store = CheckpointStore(tmp_path)
    (store.checkpoints_dir / "checkpoint-00000001").mkdir(parents=True)
    assert store.prune(1) == []
    assert len(store.list()) == 1


# ---- optimizer state ----------------------------------------------------------------------------

def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)


def train(model: nn.Module, optimizer, steps: range, scheduler=None) -> list[float]:
    lrs = []
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def through_checkpoint(tmp_path, tensors, json_obj):
    """Round trip via a real checkpoint: safetensors + JSON on disk."""
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(1, {"train_state": tensors}, {"json": json_obj})
    tensor_files, state = store.load(store.list()[0])
    return tensor_files["train_state"], state["json"]


def make_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_adamw_state_round_trip_by_name_with_reordered_params_is_exact(tmp_path):
    model_a = make_linear()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2, weight_decay=0.1)
    train(model_a, opt_a, range(3))

    tensors, json_obj = optimizer_state_to_files(opt_a, ["weight", "bias"])
    assert tensors["state.weight.step"].dtype == torch.float32 and tensors["state.weight.step"].dim() == 0
    tensors, json_obj = through_checkpoint(tmp_path, tensors, json_obj)

    model_b = make_linear()
    model_b.load_state_dict(copy.deepcopy(model_a.state_dict()))
    opt_b = torch.optim.AdamW([model_b.bias, model_b.weight], lr=5.0, weight_decay=0.0)  # overwritten
    load_optimizer_state(opt_b, ["bias", "weight"], tensors, json_obj)
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["betas"] == (0.9, 0.999)

    train(model_a, opt_a, range(3, 6))
    train(model_b, opt_b, range(3, 6))
    assert torch.equal(model_a.weight, model_b.weight) and torch.equal(model_a.bias, model_b.bias)
    for param_a, param_b in ((model_a.weight, model_b.weight), (model_a.bias, model_b.bias)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[param_a][key], opt_b.state[param_b][key]), key
        assert opt_b.state[param_b]["step"].dtype == torch.float32


def test_sgd_momentum_state_with_two_groups_round_trips(tmp_path):
    model_a = make_linear()
    opt_a = torch.optim.SGD([{"params": [model_a.weight]}, {"params": [model_a.bias], "lr": 0.5}],
                            lr=0.1, momentum=0.9)
    train(model_a, opt_a, range(2))
    tensors, json_obj = through_checkpoint(tmp_path, *optimizer_state_to_files(opt_a, ["w", "b"]))

    model_b = make_linear()
    model_b.load_state_dict(copy.deepcopy(model_a.state_dict()))
    opt_b = torch.optim.SGD([{"params": [model_b.weight]}, {"params": [model_b.bias]}], lr=0.1, momentum=0.9)
    load_optimizer_state(opt_b, ["w", "b"], tensors, json_obj)
    assert opt_b.param_groups[1]["lr"] == 0.5
    train(model_a, opt_a, range(2, 4))
    train(model_b, opt_b, range(2, 4))
    assert torch.equal(model_a.weight, model_b.weight) and torch.equal(model_a.bias, model_b.bias)


def test_optimizer_param_mismatch_names_missing_and_extra():
    model = make_linear()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, range(1))
    tensors, json_obj = optimizer_state_to_files(opt, ["weight", "bias"])
    fresh = torch.optim.AdamW(make_linear().parameters())
    with pytest.raises(ValueError, match=r"missing.*'bias'.*new.*'renamed_bias'"):
        load_optimizer_state(fresh, ["weight", "renamed_bias"], tensors, json_obj)
    with pytest.raises(ValueError, match="2 parameters"):
        load_optimizer_state(fresh, ["weight"], tensors, json_obj)
    with pytest.raises(ValueError, match="SGD"):
        load_optimizer_state(torch.optim.SGD(make_linear().parameters(), lr=0.1), ["weight", "bias"],
                             tensors, json_obj)


def test_param_names_may_contain_dots():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.ones(1, 2)
    model(x).sum().backward()
    opt.step()
    names = [name for name, _ in model.named_parameters()]  # "0.weight", "0.bias"
    tensors, json_obj = optimizer_state_to_files(opt, names)
    assert "state.0.weight.exp_avg" in tensors
    fresh_model = nn.Sequential(nn.Linear(2, 2))
    fresh = torch.optim.AdamW(fresh_model.parameters())
    load_optimizer_state(fresh, names, tensors, json_obj)
    assert torch.equal(fresh.state[fresh_model[0].bias]["exp_avg"], opt.state[model[0].bias]["exp_avg"])


# ---- RNG / scheduler / scaler -------------------------------------------------------------------

def draw_everything(generator: torch.Generator) -> list:
    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(4).tolist(), torch.randn(3).tolist(), torch.rand(2, generator=generator).tolist()]


def test_rng_round_trip_continues_the_same_streams(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn(1)  # leave cached gaussians behind: they are state too
    tensors, json_obj = capture_rng_state({"noise": generator})
    tensors, json_obj = through_checkpoint(tmp_path, tensors, json_obj)
    expected = draw_everything(generator)

    draw_everything(generator)  # move every stream on
    notes = restore_rng_state(tensors, json_obj, {"noise": generator})
    assert notes == [] or all("CUDA" in n for n in notes)
    assert draw_everything(generator) == expected


def warmup_cosine(step: int) -> float:
    return (step + 1) / 4 if step < 4 else 0.5 * (1 + math.cos(math.pi * (step - 4) / 20))


def test_lambda_lr_round_trip_has_no_off_by_one(tmp_path):
    model_a = make_linear()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, warmup_cosine)
    train(model_a, opt_a, range(6), sched_a)
    tensors, json_obj = optimizer_state_to_files(opt_a, ["weight", "bias"])
    saved = {"optimizer": json_obj, "scheduler": scheduler_state_to_json(sched_a)}
    tensors, saved = through_checkpoint(tmp_path, tensors, saved)

    model_b = make_linear()
    model_b.load_state_dict(copy.deepcopy(model_a.state_dict()))
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, warmup_cosine)  # constructor steps once
    load_optimizer_state(opt_b, ["weight", "bias"], tensors, saved["optimizer"])
    load_scheduler_state(sched_b, saved["scheduler"])

    assert sched_b.last_epoch == sched_a.last_epoch and sched_b.get_last_lr() == sched_a.get_last_lr()
    lrs_a = train(model_a, opt_a, range(6, 12), sched_a)
    lrs_b = train(model_b, opt_b, range(6, 12), sched_b)
    assert lrs_a == lrs_b
    assert torch.equal(model_a.weight, model_b.weight)


def test_grad_scaler_state_round_trip():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    obj = json.loads(json.dumps(grad_scaler_state_to_json(scaler)))
    fresh = torch.amp.GradScaler("cpu")
    load_grad_scaler_state(fresh, obj)
    assert fresh.state_dict() == scaler.state_dict()
    load_grad_scaler_state(fresh, {})  # saved while disabled: nothing to restore, no error


def test_apply_determinism_settings_restores_threads_and_reports_versions():
    original = determinism_settings()
    try:
        saved = dict(original, num_threads=original["num_threads"] + 1, torch_version="0.0.1")
        notes = apply_determinism_settings(saved)
        assert torch.get_num_threads() == original["num_threads"] + 1
        assert any("threads" in n for n in notes) and any("0.0.1" in n for n in notes)
        assert apply_determinism_settings(determinism_settings()) == []
    finally:
        apply_determinism_settings(original)
    assert determinism_settings() == original


# ---- policy -------------------------------------------------------------------------------------

# Regexes, so that safetensors.torch.load( and prose such as "no pickle." do not count.
FORBIDDEN = {
    "torch.load(": r"(?<![\w.])torch\.load\(",
    "import pickle": r"\bimport\s+(c?pickle|dill)\b",
    "from pickle": r"\bfrom\s+(c?pickle|dill)\s+import\b",
    "pickle.": r"\b(c?pickle|dill)\.[A-Za-z_]",
    "weights_only=False": r"weights_only\s*=\s*False",
    "allow_pickle=True": r"allow_pickle\s*=\s*True",
}


def test_forbidden_patterns_catch_pickle_but_not_safetensors():
    def hits(line):
        return [name for name, pattern in FORBIDDEN.items() if re.search(pattern, line)]
    assert hits("state = torch.load(path, weights_only=False)") == ["torch.load(", "weights_only=False"]
    assert hits("import pickle") == ["import pickle"]
    assert hits("data = pickle.dumps(obj)") == ["pickle."]
    assert hits("np.load(f, allow_pickle=True)") == ["allow_pickle=True"]
    assert hits("tensors = safetensors.torch.load(data)  # no pickle.") == []


def test_package_never_uses_pickle():
    offenders = []
    for path in sorted((REPO_ROOT / "lora_trainer").rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            offenders += [f"{path.relative_to(REPO_ROOT)}:{number}: {name}"
                          for name, pattern in FORBIDDEN.items() if re.search(pattern, line)]
    assert offenders == [], "pickle-based loading is forbidden:\n" + "\n".join(offenders)
