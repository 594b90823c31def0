"""Training-speed, memory, checkpoint and startup benchmark of lora_trainer on CPU.

    .venv/bin/python benchmarks/bench_training.py            # full run (< 10 minutes idle)
    .venv/bin/python benchmarks/bench_training.py --quick    # smoke run (< 2 minutes idle)
    .venv/bin/python benchmarks/bench_training.py --profile  # + cProfile of the real Trainer

What it compares (see benchmarks/README.md): the real Trainer (`train_from_config`), a reference
loop that re-reads and re-encodes every batch the way the diffusers example scripts do, and a
floor (a bare UNet forward/backward + AdamW on pre-made tensors) - all on the same small SD1-shaped
random-weight model, the same data, the same LoRA layers, fp32 on CPU with 2 threads.

Every variant runs in its own subprocess (this file re-invoked with --worker), so peak RSS is per
variant. The variants of a round run in LOCKSTEP: all processes are started, and the parent lets
exactly one of them do one optimizer step at a time, round-robin in a rotating order, while the
others wait on a pipe (idle, no CPU). Step k of every variant is thus measured within seconds of
step k of the others, under the same background load: on a shared machine that is far steadier
than timing whole runs one after another. Medians over all timed steps are reported, and ratios
are also given as the median of per-step paired ratios.

The parent process never imports torch: it only starts processes and prints the table.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.metadata
import io
import json
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # `python benchmarks/bench_training.py` without an install

WAIT_LINE = "BENCH_WAIT"          # worker -> parent: "step done, waiting for the next go"
RESULT_PREFIX = "BENCH_RESULT "   # worker -> parent: the measurements (JSON), last line
MODEL_STEM = "bench-sd1"
THREADS = 2
BATCH = 2
RANK = 8
RESOLUTION = 256
NUM_IMAGES = 16
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
WARMUP_STEPS = 2
SEED = 42
MIB = 1 << 20

# steps per training run (the first WARMUP_STEPS are not timed) and rounds (fresh processes)
MODES = {
    "quick": {"steps": 12, "rounds": 1, "save_steps": 10},
    "full": {"steps": 32, "rounds": 3, "save_steps": 10},
}
TRAINING_VARIANTS = ("ours", "reencode", "floor", "ckpt")

# ---- targets -------------------------------------------------------------------------------------
TARGET_VS_FLOOR = 0.05          # ours at most 5% slower than the floor
TARGET_VS_REENCODE = 1.3        # ours at least 1.3x the re-encode reference
TARGET_PEAK_RSS_MIB = 1024      # ours peak RSS
TARGET_CKPT_OVERHEAD = 0.02     # checkpoint overhead at save_steps 100


# =================================================================================================
# The model and the data
# =================================================================================================

def bench_sd1_configs() -> dict:
    """Small but real SD1 shape: 4 UNet levels (CrossAttn x3 + Down / Up + CrossAttn x3), 2 resnets
    per level, 4 attention heads, 256-dim cross attention; a 4-layer 256-wide CLIP text encoder with
    the full 49408-token vocabulary; a VAE a bit larger than the tiny one: 4 levels (factor 8) of
    (32, 64, 128, 128) channels, 2 layers per level. What re-encoding costs relative to a training
    step decides the re-encode comparison, so the VAE is sized by that ratio, measured on a 2-core
    CPU (VAE encode of a batch / UNet forward+backward on it): SD1.5 at 512 px 0.55; the tiny VAE
    (32 channels everywhere) 0.12; this one 0.40 - still a little cheaper than the real thing."""
    from lora_trainer.backbones.tiny import tiny_sd1_configs

    configs = tiny_sd1_configs()
    configs["unet"].update(
        sample_size=RESOLUTION // 8,
        block_out_channels=[64, 128, 256, 256],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        cross_attention_dim=256,
        attention_head_dim=4,   # diffusers' SD1 misnomer: the number of heads
    )
    configs["vae"].update(sample_size=RESOLUTION, block_out_channels=[32, 64, 128, 128], layers_per_block=2)
    configs["text_encoder"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=4, projection_dim=256, vocab_size=49408)
    return configs


def model_path(workdir: Path) -> Path:
    return workdir / "models" / f"{MODEL_STEM}.safetensors"


def prepare(workdir: Path) -> dict:
    """Write the model (single file + `<stem>.config/`) and the dataset once per workdir."""
    import torch

    from lora_trainer.backbones import tiny
    from lora_trainer.tools.demo import write_dataset

    info = {}
    checkpoint = model_path(workdir)
    if not checkpoint.exists():
        configs = bench_sd1_configs()
        components = tiny.build_models_from_configs(configs, seed=0)
        components["configs"] = configs
        info["params_m"] = {name: sum(p.numel() for p in components[name].parameters()) / 1e6
                            for name in ("unet", "vae", "text_encoder")}
        tiny.write_config_folder(checkpoint.with_suffix(".config"), configs)
        tiny.write_single_file(checkpoint, components)
    if not (workdir / "data").exists():
        write_dataset(workdir / "data", count=NUM_IMAGES, size=RESOLUTION, seed=0)
    info["model_mib"] = checkpoint.stat().st_size / MIB
    info["torch_default_threads"] = torch.get_num_threads()
    return info


def train_config(workdir: Path, tag: str, steps: int, save_steps: int, **overrides) -> dict:
    """The one config every Trainer run uses (paths differ per run; `overrides` for the fast-path
    levers of bench_fastpath.py)."""
    run = workdir / "runs" / tag
    return {**{
        "train_data_dir": str(workdir / "data"),
        "base_model": str(model_path(workdir)),
        "output_dir": str(run / "out"),
        "output_name": "bench",
        "run_dir": str(run / "run"),
        "resolution": RESOLUTION,
        "batch_size": BATCH,
        "lora_rank": RANK,
        "target_modules": "attn-mlp",
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "mixed_precision": "no",
        "device": "cpu",
        "num_threads": THREADS,
        "seed": SEED,
        "epochs": 1000,
        "max_train_steps": steps,
        "save_steps": save_steps,
    }, **overrides}


# =================================================================================================
# Memory
# =================================================================================================

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB   # Linux: KiB


def reset_peak_rss() -> bool:
    """Linux: restart the high-water mark (VmHWM, and with it ru_maxrss) from the current RSS."""
    from lora_trainer.monitor.system import reset_peak_memory   # (worker processes only: torch)
    return reset_peak_memory("cpu")


def current_rss_mib() -> float | None:
    from lora_trainer.monitor.system import cpu_memory
    rss = cpu_memory()["rss"]
    return rss / MIB if rss is not None else None


class PeakTracker:
    """Peak RSS of the whole process, of the training phase alone (from `start_training`, when the
    OS lets us restart the high-water mark) and the RSS when training starts."""

    def __init__(self):
        self.setup_peak = self.start_rss = None

    def start_training(self):
        self.start_rss = current_rss_mib()
        self.setup_peak = peak_rss_mib()
        if not reset_peak_rss():
            self.setup_peak = None

    def result(self) -> dict:
        now = peak_rss_mib()
        out = {"start_rss_mib": self.start_rss, "setup_peak_rss_mib": self.setup_peak}
        if self.setup_peak is None:
            return {**out, "peak_rss_mib": now, "train_peak_rss_mib": None}
        return {**out, "peak_rss_mib": max(now, self.setup_peak), "train_peak_rss_mib": now}


# =================================================================================================
# Workers (one variant per process)
# =================================================================================================

class StepClock:
    """Wall and CPU time of each step, from the parent's go to the step's end. `begin()` first
    waits for the go (in lockstep mode), so time spent waiting for other variants never counts."""

    def __init__(self, lockstep: bool):
        self.lockstep = lockstep
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.started = None

    def begin(self) -> None:
        if self.lockstep:
            print(WAIT_LINE, flush=True)
            if not sys.stdin.readline():
                raise SystemExit("the benchmark parent went away")
        self.started = (time.perf_counter(), time.process_time())

    def end(self) -> float:
        now = time.perf_counter()
        self.wall.append(now - self.started[0])
        self.cpu.append(time.process_time() - self.started[1])
        return now

    def result(self) -> dict:
        return {"step_seconds": self.wall[WARMUP_STEPS:], "step_cpu_seconds": self.cpu[WARMUP_STEPS:],
                "warmup_seconds": self.wall[:WARMUP_STEPS]}


def worker_ours(workdir: Path, steps: int, save_steps: int, tag: str, lockstep: bool,
                profile: bool, overrides: dict | None = None, keep_run: bool = False) -> dict:
    """The real Trainer through `train_from_config`, timed by a TrainingObserver. A step's time runs
    from the go after the previous on_step to this on_step: the previous step's _after_step (its
    checkpoint, if any), data, forward/backward, clipping, optimizer, scheduler and the run's other
    observers (they are called before ours)."""
    from lora_trainer.config.load import config_from_dict
    from lora_trainer.training.control import TrainingObserver
    from lora_trainer.app.session import train_from_config

    tracker = PeakTracker()
    clock = StepClock(lockstep)

    class Clock(TrainingObserver):
        def __init__(self):
            self.first = self.last_step_end = self.end = None
            self.go_after: dict[int, float] = {}      # step -> when the step after it began
            self.checkpoints: list[tuple[int, float]] = []
            self.report_seconds: list[float] = []

        def on_start(self, info):
            tracker.start_training()
            clock.begin()
            self.first = clock.started[0]

        def on_step(self, report):
            self.last_step_end = clock.end()
            self.report_seconds.append(report.seconds)
            if report.step < report.total_steps:
                clock.begin()
                self.go_after[report.step] = clock.started[0]

        def on_checkpoint(self, step, path):
            self.checkpoints.append((step, time.perf_counter()))

        def on_end(self, result):
            self.end = time.perf_counter()

    shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)
    cfg = config_from_dict(train_config(workdir, tag, steps, save_steps, **(overrides or {})), base_dir=workdir)
    observer = Clock()
    t0 = time.perf_counter()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    result = train_from_config(cfg, observers=[observer])
    if profiler:
        profiler.disable()
    if result.status != "finished":
        raise RuntimeError(f"training did not finish: {result.status} {result.message}")
    out = {
        **clock.result(),
        "report_seconds": observer.report_seconds[WARMUP_STEPS:],
        # busy time of the run: every step (waits excluded) + the final save
        "run_seconds": sum(clock.wall) + (observer.end - observer.last_step_end),
        "setup_seconds": observer.first - t0,
        # a mid-run save: from the go after its step's on_step to on_checkpoint
        "save_seconds": [t - observer.go_after[s] for s, t in observer.checkpoints if s in observer.go_after],
        "final_save_seconds": [observer.end - observer.last_step_end],
        **tracker.result(),
    }
    if not keep_run:
        shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)
    if profiler:
        out["profile"] = profile_text(profiler)
    return out


def profile_text(profiler, limit: int = 30) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    text.write("\n---- lora_trainer functions only (cumulative) ----\n")
    stats.sort_stats("cumulative").print_stats(r"lora_trainer[/\\]", limit)
    return text.getvalue()


def load_frozen_with_lora(workdir: Path, base_dtype: str = "fp32", foreach: bool | None = None):
    """The same model, frozen, with the same LoRA layers (same targets, rank, init) as the Trainer.
    `base_dtype` "bf16": UNet and text encoder held in bf16 (the LoRA stays fp32). `foreach`: AdamW's
    kernel; None is torch's own choice (the per-parameter loop on the CPU), which is what kohya's and
    the diffusers scripts' `torch.optim.AdamW(params, ...)` get; the Trainer's eager run uses the
    bit-identical multi-tensor kernel (True)."""
    import torch

    from lora_trainer.backbones.diffusers_sd import load_backbone
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.lora.targets import select_targets

    torch.set_num_threads(THREADS)
    dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    backbone = load_backbone(str(model_path(workdir)), device="cpu", dtype=dtype)
    backbone.freeze()
    targets = select_targets(backbone.lora_targets(), "attn-mlp", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        network = LoRANetwork(targets, RANK)
    network.attach()
    params = [p for _, p in network.trainable_parameters(text_encoder=False)]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, foreach=foreach)
    return backbone, params, optimizer


def dataset_items(workdir: Path) -> list[tuple[Path, str]]:
    items = []
    for image in sorted((workdir / "data").rglob("*.png")):
        items.append((image, image.with_suffix(".txt").read_text(encoding="utf-8").strip()))
    return items


def worker_reencode(workdir: Path, steps: int, lockstep: bool) -> dict:
    """The diffusers-example-script data path: every step reads and resizes the images, VAE-encodes
    them and CLIP-encodes the captions, then UNet forward/backward, gradient clipping, AdamW."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    backbone, params, optimizer = load_frozen_with_lora(workdir)
    unet, vae, text_encoder, tokenizer = (backbone.unet, backbone.vae, backbone.text_encoder,
                                          backbone.tokenizer)
    scheduler_config = json.loads((model_path(workdir).with_suffix(".config") / "scheduler" /
                                   "scheduler_config.json").read_text(encoding="utf-8"))
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    items = dataset_items(workdir)
    torch.manual_seed(SEED)

    def preprocess(path: Path) -> torch.Tensor:   # Resize(256) + CenterCrop(256) + Normalize([0.5])
        image = Image.open(path).convert("RGB")
        scale = RESOLUTION / min(image.size)
        image = image.resize((max(RESOLUTION, round(image.width * scale)),
                              max(RESOLUTION, round(image.height * scale))), Image.BILINEAR)
        left, top = (image.width - RESOLUTION) // 2, (image.height - RESOLUTION) // 2
        image = image.crop((left, top, left + RESOLUTION, top + RESOLUTION))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - 0.5) / 0.5

    def batches():   # a shuffling loader, epoch after epoch
        rng = random.Random(SEED)
        while True:
            order = list(range(len(items)))
            rng.shuffle(order)
            for start in range(0, len(order) - BATCH + 1, BATCH):
                yield [items[i] for i in order[start:start + BATCH]]

    tracker = PeakTracker()
    tracker.start_training()
    clock = StepClock(lockstep)
    loader = batches()
    for _ in range(steps):
        clock.begin()
        batch = next(loader)
        pixel_values = torch.stack([preprocess(path) for path, _ in batch])
        input_ids = tokenizer([caption for _, caption in batch], max_length=tokenizer.model_max_length,
                              padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        clock.end()
    return {**clock.result(), **tracker.result()}


def worker_floor(workdir: Path, steps: int, lockstep: bool, channels_last: bool = False) -> dict:
    """Nothing but the UNet forward/backward through the LoRA layers and the AdamW step, on tensors
    made before the loop. `channels_last`: the UNet's weights and input in NHWC (a lever measured by
    bench_fastpath.py)."""
    import torch
    import torch.nn.functional as F

    backbone, params, optimizer = load_frozen_with_lora(workdir, foreach=True)   # the Trainer's kernel
    unet = backbone.unet
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(SEED)
    latent_size = RESOLUTION // 8
    latents = torch.randn((BATCH, 4, latent_size, latent_size), generator=generator)
    cond = torch.randn((BATCH, 77, backbone.text_encoder.config.hidden_size), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
    a = backbone.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).contiguous(memory_format=memory_format)

    tracker = PeakTracker()
    tracker.start_training()
    clock = StepClock(lockstep)
    for _ in range(steps):
        clock.begin()
        prediction = unet(noisy, timesteps, encoder_hidden_states=cond).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end()
    return {**clock.result(), **tracker.result()}


def run_worker(args) -> None:
    workdir = Path(args.workdir)
    lockstep = not args.free
    t0 = time.perf_counter()
    if args.worker == "prepare":
        out = prepare(workdir)
    elif args.worker in ("ours", "ckpt"):
        save_steps = args.save_steps if args.worker == "ckpt" else 0
        out = worker_ours(workdir, args.steps, save_steps, args.tag, lockstep, args.profile)
    elif args.worker == "reencode":
        out = worker_reencode(workdir, args.steps, lockstep)
    elif args.worker == "floor":
        out = worker_floor(workdir, args.steps, lockstep)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    out["worker_seconds"] = time.perf_counter() - t0
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# =================================================================================================
# Parent side: starting workers and the real CLI
# =================================================================================================

# Environment of every measured process. OMP_WAIT_POLICY=PASSIVE (unless --omp-active or already
# set): with torch's default (active, spinning) OpenMP waits, a 2-core machine that also runs other
# work makes every step 5-10x slower and the timings meaningless; idle threads that sleep instead
# cost almost nothing on an idle machine and keep the comparison fair on a busy one.
CHILD_ENV = dict(os.environ)


def env_for(workdir: Path, cache: str) -> dict:
    """The measured process's environment, with its own empty latent/text cache folder (a first run
    on this machine; never the user's ~/.cache)."""
    folder = workdir / "cache" / cache
    shutil.rmtree(folder, ignore_errors=True)
    return {**CHILD_ENV, "LORA_TRAINER_CACHE": str(folder)}


def wait_with_rusage(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap the child ourselves to get ITS peak RSS (os.wait4), not the max over all children."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024 / MIB


class Worker:
    """One measured process (this file with --worker) and the parent's end of its pipes."""

    def __init__(self, workdir: Path, kind: str, steps: int = 0, save_steps: int = 0, tag: str = "",
                 lockstep: bool = True, profile: bool = False, *, script: str | None = None,
                 extra_args: tuple = (), extra_env: dict | None = None, drop_env: tuple = ()):
        """`script`: the benchmark file whose --worker runs the measurement (default this one)."""
        self.kind = kind
        cmd = [sys.executable, str(Path(script or __file__).resolve()), "--worker", kind, "--workdir",
               str(workdir), "--steps", str(steps), "--save-steps", str(save_steps), "--tag", tag or kind]
        cmd += [] if lockstep else ["--free"]
        cmd += ["--profile"] if profile else []
        cmd += list(extra_args)
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if lockstep else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO,
                                     env={k: v for k, v in {**env_for(workdir, tag or kind), **(extra_env or {})}.items()
                                          if k not in drop_env})
        self.result = None

    def expect(self, what: str) -> None:
        """Read the worker's stdout up to its next WAIT ("wait") or its RESULT line ("result")."""
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line == WAIT_LINE and what == "wait":
                return
            if line.startswith(RESULT_PREFIX) and what == "result":
                self.result = json.loads(line[len(RESULT_PREFIX):])
                return
            if line == WAIT_LINE or line.startswith(RESULT_PREFIX):
                self.fail(f"expected {what}, got {line[:40]}")
        self.fail(f"exited while the parent expected {what}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        if self.result is None:
            self.expect("result")
        if self.proc.stdin:
            self.proc.stdin.close()
        code, peak = wait_with_rusage(self.proc)
        if code != 0:
            self.fail(f"exit code {code}")
        self.result["child_peak_rss_mib"] = peak
        return self.result

    def fail(self, why: str):
        self.kill()
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:]
        raise RuntimeError(f"worker {self.kind}: {why}\n--- its stderr (tail) ---\n{tail}")

    def kill(self) -> None:
        if self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_alone(workdir: Path, kind: str, **kwargs) -> dict:
    return Worker(workdir, kind, lockstep=False, **kwargs).finish()


def lockstep_round(workdir: Path, r: int, steps: int, save_steps: int) -> dict:
    """Start every training variant, then let them take one step each in turn (rotating order)."""
    return run_lockstep({name: Worker(workdir, name, steps, save_steps, f"{name}-{r}")
                         for name in TRAINING_VARIANTS}, r, steps)


def run_lockstep(workers: dict, r: int, steps: int) -> dict:
    """Started workers -> their results: one step each in turn, the order rotating by step and round."""
    try:
        for worker in workers.values():
            worker.expect("wait")            # loaded and set up, waiting before its first step
        names = list(workers)
        for k in range(steps):
            shift = (k + r) % len(names)
            for name in names[shift:] + names[:shift]:
                workers[name].go()
                workers[name].expect("result" if k == steps - 1 else "wait")
        return {name: worker.finish() for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("lora-trainer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lora_trainer"]


STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) epoch\b")


def cli_until_first_step(config: Path, env: dict) -> dict:
    """`lora-trainer train` until its first trained step, then SIGTERM (a clean stop: the step
    finishes and a checkpoint is written). The marker is the train.log progress line of the first
    step of the session, which --verbose also prints on stderr as soon as the step is done."""
    cmd = cli_command() + ["--verbose", "train", "--config", str(config), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=config.parent, env=env)
    marks: dict[str, float] = {}
    first_step = None
    tail: list[str] = []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        tail = (tail + [line])[-30:]
        if f"{MODEL_STEM}.safetensors" in line:       # the loader's first log line names the file
            marks.setdefault("model_load", now)
        if "Resuming from step" in line:
            marks.setdefault("resumed", now)
        match = STEP_LINE.search(line)
        if match and first_step is None:
            first_step = int(match.group(1))
            marks["first_step"] = now
            proc.send_signal(signal.SIGTERM)
    code, peak = wait_with_rusage(proc)
    marks["exit"] = time.perf_counter() - t0
    if first_step is None or code not in (0, 130):
        sys.stderr.write("".join(tail))
        raise RuntimeError(f"lora-trainer train exited with {code} (first step seen: {first_step})")
    return {"marks": marks, "first_step": first_step, "exit_code": code, "child_peak_rss_mib": peak}


def cli_cold_and_resume(workdir: Path, tag: str) -> dict:
    import yaml   # the parent stays free of torch; pyyaml is a dependency of the project

    shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)
    config = workdir / f"{tag}.yaml"
    cfg = train_config(workdir, tag, steps=1000, save_steps=0)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = env_for(workdir, tag)     # the resume finds the caches the cold start wrote
    cold = cli_until_first_step(config, env)
    resumed = cli_until_first_step(config, env)
    if resumed["first_step"] <= 1 or "resumed" not in resumed["marks"]:
        raise RuntimeError(f"the second run did not resume (first step {resumed['first_step']})")
    shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)
    config.unlink()
    return {"cold": cold, "resume": resumed}


# =================================================================================================
# Orchestration and the table
# =================================================================================================

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_average() -> str:
    try:
        return "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "?"


def orchestrate(args) -> int:
    mode = dict(MODES["quick" if args.quick else "full"])
    if args.rounds:
        mode["rounds"] = args.rounds
    if args.steps:
        mode["steps"] = args.steps
    if not args.omp_active:
        CHILD_ENV.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    steps, rounds, save_steps = mode["steps"], mode["rounds"], mode["save_steps"]
    started, load_start = time.perf_counter(), load_average()
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lt-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"preparing model and data in {workdir} ...", flush=True)
    results: dict[str, list] = {name: [] for name in (*TRAINING_VARIANTS, "cli")}
    profile = None
    try:
        prep = run_alone(workdir, "prepare")
        for r in range(rounds):
            t0 = time.perf_counter()
            for name, result in lockstep_round(workdir, r, steps, save_steps).items():
                results[name].append(result)
            print(f"  round {r + 1}/{rounds}: training variants in lockstep {time.perf_counter() - t0:6.1f} s "
                  f"(load {load_average()})", flush=True)
            t0 = time.perf_counter()
            results["cli"].append(cli_cold_and_resume(workdir, f"cli-{r}"))
            print(f"  round {r + 1}/{rounds}: lora-trainer cold start + resume {time.perf_counter() - t0:6.1f} s "
                  f"(load {load_average()})", flush=True)
        if args.profile:
            profile = run_alone(workdir, "ours", steps=steps, tag="profile", profile=True)
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    raw = {"prep": prep, "results": results, "mode": mode, "elapsed": time.perf_counter() - started,
           "load_start": load_start, "load_end": load_average(), "omp": CHILD_ENV.get("OMP_WAIT_POLICY"),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print()
    print(render(raw))
    if profile:
        print("\ncProfile of the real Trainer (train_from_config, whole process, not in lockstep):")
        print(profile["profile"])
    return 0


def environment(raw: dict) -> list[str]:
    prep = raw["prep"]

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    omp = raw.get("omp") or "library default (active)"
    return [
        f"date {raw['date']}  host {platform.node()}  {platform.platform()}",
        f"CPU {cpu}, {os.cpu_count()} logical cores; torch threads {THREADS} (torch default "
        f"{prep.get('torch_default_threads')}); OMP_WAIT_POLICY {omp}",
        f"load average (1/5/15 min) at start {raw['load_start']}, at end {raw['load_end']}",
        f"python {platform.python_version()}  torch {version('torch')}  diffusers {version('diffusers')}  "
        f"transformers {version('transformers')}  safetensors {version('safetensors')}  "
        f"lora_trainer {version('lora_trainer')}",
        "model: UNet (64,128,256,256) x 2 layers/level, CrossAttn x3, 4 heads, cross-attn 256; "
        "CLIP-text 256 x 4 layers,",
        f"       vocab 49408; VAE (32,64,128,128) x 2 layers/level (f8); single file {prep.get('model_mib', 0):.0f} MiB "
        f"+ {MODEL_STEM}.config/",
        f"run: {NUM_IMAGES} images {RESOLUTION} px, batch {BATCH}, rank {RANK}, attn-mlp, fp32 CPU, "
        f"AdamW lr {LEARNING_RATE:g}",
    ]


WIDTH = 118


def render(raw: dict) -> str:
    results, mode = raw["results"], raw["mode"]
    steps, save_steps, rounds = mode["steps"], mode["save_steps"], mode["rounds"]
    lines = ["=" * WIDTH, "lora_trainer training benchmark", *environment(raw), "-" * WIDTH]
    lines.append(f"{'':52s}{'median':>10s}{'range of':>16s}{'CPU s/step':>12s}{'samples/s':>10s}"
                 f"{'peak RSS':>9s}{'RSS at':>11s}")
    lines.append(f"{'':52s}{'':>10s}{'run medians':>16s}{'(median)':>12s}{'':>10s}{'MiB':>9s}{'start MiB':>11s}")

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def row(label, value, lo=None, hi=None, unit="s", cpu=None, sps=None, peak=None, start_rss=None):
        spread = f"{lo:.3f}-{hi:.3f}" if lo is not None else "-"
        lines.append(f"{label:52s}{num(value, '.3f') + ' ' + unit:>10s}{spread:>16s}{num(cpu, '.3f'):>12s}"
                     f"{num(sps, '.2f'):>10s}{num(peak, '.0f'):>9s}{num(start_rss, '.0f'):>11s}")

    def pooled(name, key="step_seconds"):
        return median([s for run in results[name] for s in run[key]])

    def run_medians(name, key="step_seconds"):
        values = [median(run[key]) for run in results[name]]
        return min(values), max(values)

    def median_of(name, key):
        return median([run.get(key) for run in results[name]])

    def paired(a, b, key="step_seconds"):
        """Median over all steps k of a's step k / b's step k (same round): both ran seconds apart."""
        return median([x / y for ra, rb in zip(results[a], results[b]) for x, y in zip(ra[key], rb[key])])

    lines.append(f"Training step, in lockstep (batch {BATCH}; {steps - WARMUP_STEPS} timed steps per run x "
                 f"{rounds} run(s), first {WARMUP_STEPS} steps excluded; pooled median)")
    wall, cpu = {}, {}
    for name, label in (("ours", "  ours: Trainer via train_from_config"),
                        ("reencode", "  re-encode reference (diffusers-example loop)"),
                        ("floor", "  floor: bare UNet fwd/bwd + AdamW, pre-made tensors"),
                        ("ckpt", f"  ours with save_steps {save_steps} (saves included)")):
        wall[name], cpu[name] = pooled(name), pooled(name, "step_cpu_seconds")
        row(label, wall[name], *run_medians(name), cpu=cpu[name], sps=BATCH / wall[name],
            peak=median_of(name, "child_peak_rss_mib"), start_rss=median_of(name, "start_rss_mib"))
    setup_peak, train_peak = median_of("ours", "setup_peak_rss_mib"), median_of("ours", "train_peak_rss_mib")
    if setup_peak is not None and train_peak is not None:
        lines.append(f"  ours, RSS: peak while loading {setup_peak:.0f} MiB, at training start "
                     f"{median_of('ours', 'start_rss_mib'):.0f} MiB, peak while training {train_peak:.0f} MiB")

    mid_saves = len([s for s in range(1, steps) if s % save_steps == 0])
    lines.append(f"Checkpoint cost ({steps}-step runs; run = all steps + final save, lockstep waits excluded)")
    runs0 = [run["run_seconds"] for run in results["ours"]]
    runs10 = [run["run_seconds"] for run in results["ckpt"]]
    row("  run, save_steps 0", median(runs0), min(runs0), max(runs0))
    row(f"  run, save_steps {save_steps} ({mid_saves} more saves)", median(runs10), min(runs10), max(runs10))
    row("  run difference per extra save (noisy)",
        (median(runs10) - median(runs0)) / mid_saves if mid_saves else None)
    saves = [s for run in results["ckpt"] for s in run["save_seconds"]]
    per_save = median(saves)
    row(f"  per save, direct: step end -> on_checkpoint (n={len(saves)})", per_save,
        min(saves) if saves else None, max(saves) if saves else None)
    finals = [s for run in results["ours"] + results["ckpt"] for s in run["final_save_seconds"]]
    row("  final save + end of run: last on_step -> on_end", median(finals), min(finals), max(finals))

    lines.append("Startup, `lora-trainer train` alone: process start -> first trained step done")
    cli_runs = {"cold": [run["cold"] for run in results["cli"]],
                "resume": [run["resume"] for run in results["cli"]]}
    for key, label in (("cold", "  cold start (empty latent/text cache)"),
                       ("resume", "  resume from its checkpoint (warm cache)")):
        firsts = [r["marks"]["first_step"] for r in cli_runs[key]]
        row(label, median(firsts), min(firsts), max(firsts),
            peak=median([r["child_peak_rss_mib"] for r in cli_runs[key]]))
    all_cli = cli_runs["cold"] + cli_runs["resume"]
    row("    of which: start -> model load begins", median([r["marks"].get("model_load") for r in all_cli]))
    resumed_at = [r["marks"]["resumed"] - r["marks"]["model_load"] for r in cli_runs["resume"]
                  if "resumed" in r["marks"] and "model_load" in r["marks"]]
    row("    resume: model load begins -> 'Resuming from'", median(resumed_at))

    lines.append("-" * WIDTH)
    lines.append("Targets (verdict on the table's wall-clock medians; [paired per-step median | CPU-time ratio])")
    vs_floor = wall["ours"] / wall["floor"] - 1
    speedup = wall["reencode"] / wall["ours"]
    ours_peak = max(run["child_peak_rss_mib"] for run in results["ours"] + results["ckpt"])
    overhead = per_save / (100 * wall["ours"]) if per_save is not None else None

    def target(label, value, goal, met):
        lines.append(f"  {label:42s}{value:>30s}   target {goal:12s} {'MET' if met else 'NOT MET'}")

    target("ours vs floor, s/step", f"{vs_floor:+.1%} [{paired('ours', 'floor') - 1:+.1%} | "
           f"{cpu['ours'] / cpu['floor'] - 1:+.1%}]", f"<= +{TARGET_VS_FLOOR:.0%}", vs_floor <= TARGET_VS_FLOOR)
    target("ours speed-up over the re-encode reference", f"{speedup:.2f}x [{paired('reencode', 'ours'):.2f}x | "
           f"{cpu['reencode'] / cpu['ours']:.2f}x]", f">= {TARGET_VS_REENCODE}x", speedup >= TARGET_VS_REENCODE)
    target("ours peak RSS (whole process, max of runs)", f"{ours_peak:.0f} MiB", f"<= {TARGET_PEAK_RSS_MIB} MiB",
           ours_peak <= TARGET_PEAK_RSS_MIB)
    if overhead is not None:
        target("checkpoint overhead at save_steps 100", f"{overhead:.2%}", f"<= {TARGET_CKPT_OVERHEAD:.0%}",
               overhead <= TARGET_CKPT_OVERHEAD)
        lines.append(f"    = per-save cost {per_save * 1000:.0f} ms / (100 x {wall['ours']:.3f} s/step); "
                     f"at save_steps {save_steps} it is {per_save / (save_steps * wall['ours']):.1%}")
    lines.append(f"total benchmark time {raw['elapsed']:.0f} s")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """Options this file and bench_fastpath.py share: where things go, and the worker's own."""
    parser.add_argument("--workdir", help="where the model/data/runs go (kept; reused if present)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--render", metavar="JSON", help="print the table of an earlier --json file")
    # internal: one measurement in this process
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--free", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (< 2 minutes on an idle machine)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--steps", type=int, help="override the steps per training run")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, run the real Trainer once more under cProfile")
    parser.add_argument("--omp-active", action="store_true",
                        help="leave OpenMP's default spinning waits (fastest only on an idle machine)")
    add_shared_options(parser)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.render:
        print(render(json.loads(Path(args.render).read_text(encoding="utf-8"))))
        return 0
    save_steps = MODES["full"]["save_steps"]
    if args.steps is not None and args.steps <= max(WARMUP_STEPS, save_steps):
        parser.error(f"--steps must be more than {max(WARMUP_STEPS, save_steps)} (one mid-run save)")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
