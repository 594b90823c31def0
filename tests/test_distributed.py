"""Multi-process training with torchrun on CPU (gloo): 2 processes, tiny model.

Checks: it completes; the LoRA equals a single-process run with the same effective batch (within
float summation tolerance: the gradient sum runs in another order); only rank 0 writes; a killed
rank stops the run, which then resumes from its last checkpoint with ONE process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.storage.checkpoints import CheckpointStore
from lora_trainer.app.session import train_from_config

FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")
RUN = dict(epochs=2, save_steps=2, learning_rate=5e-3, num_threads=1, keep_last_n_checkpoints=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script_args, nproc=2, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(FAULT_RUNNER.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def train_two_ways(make_config, run: dict):
    """The same run by 2 processes x accumulation 1 (torchrun) and 1 process x accumulation 2.
    Returns (the torchrun result, its config, its LoRA tensors + metadata, the 1-process result and
    tensors)."""
    multi = make_config("multi", gradient_accumulation_steps=1, **run)
    proc = torchrun(["-m", "lora_trainer", "train", "--config", str(multi), "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train_from_config(load_config(make_config("single", gradient_accumulation_steps=2, **run)))
    cfg = load_config(multi)
    lora_multi, meta = read_lora_file(Path(cfg.output_dir) / f"{cfg.output_name}.safetensors")
    lora_single, _ = read_lora_file(single.lora_path)
    return proc, cfg, lora_multi, meta, single, lora_single


def assert_same_lora(lora_multi, lora_single):
    for k in lora_single:
        a, b = lora_multi[k].double(), lora_single[k].double()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (k, (a - b).abs().max())


def test_two_processes_match_one_process_with_the_same_effective_batch(make_config):
    # 12 samples, batch 2: 2 ranks x accumulation 1 == 1 process x accumulation 2
    proc, cfg, lora_multi, meta, single, lora_single = train_two_ways(make_config, RUN)
    assert meta["ss_total_batch_size"] == "4" and meta["ss_steps"] == str(single.step) == "6"
    assert_same_lora(lora_multi, lora_single)
    # only rank 0 wrote: every message once in the log, every checkpoint valid
    log = (Path(cfg.run_dir) / "logs" / "train.log").read_text()
    assert log.count("event checkpoint") == 3
    assert log.count("Finished 6 steps") == 1
    assert all(i.valid for i in CheckpointStore(cfg.run_dir).list())
    assert "effective batch 4" in proc.stdout


def test_a_killed_rank_stops_the_run_and_one_process_resumes_it(make_config):
    cfg_path = make_config(gradient_accumulation_steps=1, **RUN)
    # rank 1 is killed in the forward of step 4 (micro-batch 4 of that process): checkpoint 2 exists
    proc = torchrun([str(FAULT_RUNNER), str(cfg_path), "--kill-at-micro", "4", "--only-rank", "1"])
    assert proc.returncode != 0
    cfg = load_config(cfg_path)
    store = CheckpointStore(cfg.run_dir)
    assert store.latest_valid()[0].step == 2
    # resume with a single process: positions are world-size independent, and the accumulation per
    # process doubles by itself so the effective batch (and the step count) stay the same
    result = train_from_config(load_config(cfg_path))
    assert result.status == "finished" and result.step == 6
    tensors, meta = read_lora_file(result.lora_path)
    assert meta["ss_steps"] == "6" and all(torch.isfinite(t).all() for t in tensors.values())


def test_two_processes_train_a_lycoris_type_like_one_process(make_config):
    """The adapter types need nothing of their own for multi-process training (LoKr + DoRA here:
    the parameters with the most unusual shapes)."""
    run = dict(RUN, epochs=1, adapter_type="lokr", dora=True, lora_rank=2, target_modules="locon")
    _, _, lora_multi, meta, _, lora_single = train_two_ways(make_config, run)
    assert any(k.endswith(".lokr_w1") for k in lora_single) and any(k.endswith(".dora_scale") for k in lora_single)
    assert lora_multi.keys() == lora_single.keys() and meta["ss_steps"] == "3"
    assert_same_lora(lora_multi, lora_single)
