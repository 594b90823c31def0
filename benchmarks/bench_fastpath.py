"""The fast path against the eager run and a kohya-equivalent cached step, side by side on CPU.

    .venv/bin/python benchmarks/bench_fastpath.py             # 3 rounds per OpenMP wait policy
    .venv/bin/python benchmarks/bench_fastpath.py --quick     # 1 round per policy, fewer steps

Same model, data and settings as bench_training.py (SD1-shaped 35M-parameter UNet, 256 px, batch 2,
rank 8, attn-mlp, AdamW, 2 threads). Rows, each its own process, all in LOCKSTEP (one optimizer step
at a time, round-robin; see bench_training.py):

  eager            the real Trainer (train_from_config), fp32: the reference
  bf16             + mixed_precision: bf16 (base weights held in bf16, autocast)
  compile          + compile: true (torch.compile, inductor)
  fast path        + compile: true + mixed_precision: bf16
  fast, flash attn the fast path with torch's flash-attention kernel for every attention (the
                   fast path computes short bf16 attention as plain matmuls: that lever on its own)
  floor            bench_training's floor (bare UNet fwd/bwd + AdamW on pre-made tensors)
  floor NHWC       the floor with channels_last weights and input (the lever on its own)
  kohya-equiv.     a loop doing what kohya-ss/sd-scripts' train_network.py does per step for SD1 with
                   --cache_latents (written here from its documented behaviour, no code taken):
                   latents cached in memory, the frozen text encoder run on the captions every step
                   (SD1 has no text-encoder-output cache there), DDPMScheduler.add_noise, the noisy
                   latents requiring grad, per-sample MSE then mean, clip_grad_norm_ 1.0, AdamW,
                   scheduler step. Its LoRA layers compute org(x) + up(down(x)) * multiplier * scale,
                   which is what our LoRANetwork computes; weights are in freshly allocated memory
                   (as kohya's load_state_dict into a built model; our single-file loader does the same).
                   AdamW is torch's default kernel, the per-parameter loop on the CPU (kohya passes no
                   foreach/fused).
  kohya-equiv. bf16  the same with kohya's --mixed_precision bf16: frozen UNet and text encoder held in
                   bf16, cached latents and noise cast to bf16, forward under bf16 autocast, LoRA fp32.
                   The fast path is compared with both: kohya's default and kohya at equal precision.

After the rounds, the optimizer kernels alone (AdamW over the run's LoRA parameters: torch's loop,
the multi-tensor kernel eager uses, the fused kernel the fast path uses) are timed on their own.

Rounds alternate the OpenMP wait policy (PASSIVE: waiting threads sleep; default: OMP_WAIT_POLICY
unset, where GNU OpenMP's threads spin a short while before they sleep), so both are measured within
one run under the same background load. After the rounds, a
correctness pass (not timed) checks the fast path: its LoRA after CHECK_STEPS steps against eager's
(the tolerance is stated in the table), and a fast-path run stopped half way and resumed in a new
process against an uninterrupted one (must be byte-identical: exact resume within the mode).

The first step of a compiled run compiles (minutes on a cold torch cache; later runs reuse the cache
in torchinductor_<user> under the temp folder); the first WARMUP_STEPS steps of every run are not timed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt   # noqa: E402  (the shared model, data, clock and lockstep machinery)

FLASH_ONLY = "_flash_only"   # not a config field: the worker turns the short-attention lever off
VARIANTS = {   # row -> Trainer config overrides (None: a hand-written loop)
    "eager": {},
    "bf16": {"mixed_precision": "bf16"},
    "compile": {"compile": True},
    "fast path": {"compile": True, "mixed_precision": "bf16"},
    # the fast path with torch's flash kernel for every attention: the short-attention lever on its own
    "fast, flash attn": {"compile": True, "mixed_precision": "bf16", FLASH_ONLY: True},
    "floor": None,
    "floor NHWC": None,
    "kohya-equiv.": None,
    "kohya-equiv. bf16": None,
}
KOHYA = "kohya-equiv."            # kohya's default precision (--mixed_precision no)
KOHYA_BF16 = "kohya-equiv. bf16"  # kohya's --mixed_precision bf16: the fast path's precision
FAST = VARIANTS["fast path"]
# PASSIVE: waiting OpenMP threads sleep. "default": OMP_WAIT_POLICY unset, torch's own setting (GNU
# OpenMP spins a short while, then sleeps). Not ACTIVE: with it GNU OpenMP spins without end, so the
# variants waiting for their turn in lockstep would burn the cores the measured one needs.
POLICIES = ("PASSIVE", "default")
MODES = {"quick": {"steps": 8, "rounds": 1}, "full": {"steps": 16, "rounds": 3}}
CHECK_STEPS = 8
TARGET_VS_KOHYA = 1.25
# eager vs fast path after CHECK_STEPS steps, on the trained (up) weights taken as one vector:
# bf16 keeps 8 bits of mantissa, and AdamW's first steps move each weight by about lr * sign(grad),
# so weights whose gradient is near zero may step the other way; what must hold is the direction
# and size of what was learned. (Element-wise they differ by up to ~70% of the largest weight.)
TOLERANCE_COSINE = 0.98       # cosine similarity of the two runs' up weights, at least
TOLERANCE_REL_NORM = 0.15     # |fast - eager| / |eager| of the up weights, at most


# =================================================================================================
# Workers
# =================================================================================================

def worker_kohya_equivalent(workdir: Path, steps: int, lockstep: bool, bf16: bool = False) -> dict:
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from lora_trainer.training.optim import build_scheduler

    backbone, params, optimizer = bt.load_frozen_with_lora(workdir, "bf16" if bf16 else "fp32")
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    scheduler = build_scheduler(optimizer, "constant", 0, steps)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, clip_sample=False)
    items = bt.dataset_items(workdir)
    torch.manual_seed(bt.SEED)
    generator = torch.Generator().manual_seed(bt.SEED)
    with torch.no_grad():   # --cache_latents: every image encoded once, kept in memory
        latents_cache = []
        for path, _ in items:
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
            latents_cache.append(backbone.encode_image(pixels, generator)[0])
    order = torch.randperm(len(items), generator=generator).tolist()

    tracker = bt.PeakTracker()
    tracker.start_training()
    clock = bt.StepClock(lockstep)
    for k in range(steps):
        clock.begin()
        picked = [order[(k * bt.BATCH + i) % len(order)] for i in range(bt.BATCH)]
        latents = torch.stack([latents_cache[i] for i in picked]).to(weight_dtype)
        with torch.no_grad(), autocast():   # the frozen text encoder, every step
            cond = backbone.encode_text([items[i][1] for i in picked])["crossattn"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (bt.BATCH,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).requires_grad_(True)
        with autocast():
            prediction = backbone.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean([1, 2, 3]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end()
    return {**clock.result(), **tracker.result()}


def worker_optimizer_kernels(workdir: Path, steps: int = 40) -> dict:
    """AdamW over the benchmark's LoRA parameters (random gradients), per kernel: median ms/step."""
    import torch

    _, params, _ = bt.load_frozen_with_lora(workdir)
    generator = torch.Generator().manual_seed(bt.SEED)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    kernels = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    out = {"tensors": len(params), "numel": sum(p.numel() for p in params)}
    for name, kernel in kernels.items():
        optimizer = torch.optim.AdamW(params, lr=bt.LEARNING_RATE, weight_decay=bt.WEIGHT_DECAY, **kernel)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        out[name] = bt.median(times[2:]) * 1000
    return out


def worker_trainer(workdir: Path, steps: int, tag: str, lockstep: bool, overrides: dict,
                   phase: str = "timed") -> dict:
    """The real Trainer with `overrides`. phase "timed": a fresh, timed run (bench_training's
    worker_ours); "stop": a fresh run that stops cleanly half way; "resume": continue the run
    folder of `tag` (the correctness pass's interrupted run) to the end."""
    if overrides.pop(FLASH_ONLY, False):
        from lora_trainer.backbones import short_attention
        short_attention.PLAIN_SCORES_LIMIT = 0   # nothing is short: every attention stays on flash
    if phase == "timed":
        return bt.worker_ours(workdir, steps, 0, tag, lockstep, False, overrides, keep_run=tag.startswith("check-"))
    from lora_trainer.app.session import train_from_config
    from lora_trainer.config.load import config_from_dict
    from lora_trainer.training.control import TrainingControl, TrainingObserver

    control = TrainingControl()

    class StopHalfWay(TrainingObserver):
        def on_step(self, report):
            if phase == "stop" and report.step == steps // 2:
                control.request_stop("benchmark: interrupted run")

    if phase == "stop":
        shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)
    cfg = config_from_dict(bt.train_config(workdir, tag, steps, 0, **overrides), base_dir=workdir)
    result = train_from_config(cfg, control, [StopHalfWay()])
    return {"status": result.status, "step": result.step}


def worker_compare(workdir: Path) -> dict:
    """The correctness pass's verdicts, from the runs' files."""
    import torch

    from lora_trainer.lora.kohya_file import read_lora_file
    from lora_trainer.storage.checkpoints import CheckpointStore

    def lora(tag):
        return read_lora_file(workdir / "runs" / tag / "out" / "bench.safetensors")[0]

    def checkpoint(tag):
        store = CheckpointStore(workdir / "runs" / tag / "run")
        info, _ = store.latest_valid()
        return store.load(info)[0]

    eager, fast, resumed_lora = lora("check-eager"), lora("check-fast"), lora("check-fast-resumed")
    trained = sorted(k for k in eager if "lora_up" in k)   # zero at the start: all of it was learned
    a, b = (torch.cat([run[k].flatten().double() for k in trained]) for run in (eager, fast))
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    rel_norm = float((b - a).norm() / a.norm())
    worst_abs = max((eager[k] - fast[k]).abs().max().item() for k in trained)
    largest = max(eager[k].abs().max().item() for k in trained)
    resumed, straight = checkpoint("check-fast-resumed"), checkpoint("check-fast")
    identical = (resumed_lora.keys() == fast.keys() and all(torch.equal(resumed_lora[k], fast[k]) for k in fast)
                 and all(resumed[part].keys() == straight[part].keys() and
                         all(torch.equal(resumed[part][k], straight[part][k]) for k in straight[part])
                         for part in ("lora", "optimizer")))
    return {"eager_vs_fast_abs": worst_abs, "eager_largest": largest, "cosine": cosine, "rel_norm": rel_norm,
            "resume_identical": identical}


def run_worker(args) -> None:
    workdir, lockstep = Path(args.workdir), not args.free
    t0 = time.perf_counter()
    if args.worker in (KOHYA, KOHYA_BF16):
        out = worker_kohya_equivalent(workdir, args.steps, lockstep, bf16=args.worker == KOHYA_BF16)
    elif args.worker == "optimizer":
        out = worker_optimizer_kernels(workdir)
    elif args.worker in ("floor", "floor NHWC"):
        out = bt.worker_floor(workdir, args.steps, lockstep, channels_last=args.worker == "floor NHWC")
    elif args.worker == "compare":
        out = worker_compare(workdir)
    else:
        out = worker_trainer(workdir, args.steps, args.tag, lockstep, json.loads(args.overrides), args.phase)
    out["worker_seconds"] = time.perf_counter() - t0
    print(bt.RESULT_PREFIX + json.dumps(out), flush=True)


# =================================================================================================
# Parent: rounds, correctness pass, table (never imports torch)
# =================================================================================================

def start(workdir: Path, name: str, steps: int, tag: str, policy: str, lockstep: bool = True,
          phase: str = "timed") -> bt.Worker:
    extra = ["--overrides", json.dumps(VARIANTS.get(name) or {}), "--phase", phase]
    return bt.Worker(workdir, name, steps, 0, tag, lockstep, script=__file__, extra_args=tuple(extra),
                     extra_env={"OMP_WAIT_POLICY": policy} if policy != "default" else {},
                     drop_env=("OMP_WAIT_POLICY",) if policy == "default" else ())


def correctness_pass(workdir: Path) -> dict:
    def alone(name, tag, phase="timed"):
        return start(workdir, name, CHECK_STEPS, tag, "PASSIVE", False, phase).finish()

    alone("eager", "check-eager")
    alone("fast path", "check-fast")
    stopped = alone("fast path", "check-fast-resumed", "stop")
    if stopped.get("status") != "stopped":
        raise RuntimeError(f"the interrupted fast-path run did not stop: {stopped}")
    alone("fast path", "check-fast-resumed", "resume")   # a new process continues the run folder
    return start(workdir, "compare", 0, "compare", "PASSIVE", False).finish()


def orchestrate(args) -> int:
    mode = MODES["quick" if args.quick else "full"]
    rounds = args.rounds or mode["rounds"]
    steps = args.steps or mode["steps"]
    started, load_start = time.perf_counter(), bt.load_average()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lt-fastpath-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {policy: {name: [] for name in VARIANTS} for policy in POLICIES}
    try:
        prep = bt.run_alone(workdir, "prepare")
        for r in range(rounds):
            for policy in POLICIES:
                t0 = time.perf_counter()
                workers = {name: start(workdir, name, steps, f"{name.replace(' ', '-')}-{r}", policy)
                           for name in VARIANTS}
                for name, result in bt.run_lockstep(workers, r, steps).items():
                    results[policy][name].append(result)
                print(f"  round {r + 1}/{rounds}, OMP_WAIT_POLICY={policy}: {time.perf_counter() - t0:6.1f} s "
                      f"(load {bt.load_average()})", flush=True)
        kernels = {policy: start(workdir, "optimizer", 0, "optimizer", policy, False).finish() for policy in POLICIES}
        checks = None if args.no_checks else correctness_pass(workdir)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    raw = {"prep": prep, "results": results, "checks": checks, "optimizer_kernels": kernels, "steps": steps, "rounds": rounds,
           "elapsed": time.perf_counter() - started, "load_start": load_start, "load_end": bt.load_average(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "omp": "PASSIVE and default, alternating rounds"}
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print()
    print(render(raw))
    return 0


def render(raw: dict) -> str:
    results, checks = raw["results"], raw["checks"]
    width = bt.WIDTH
    lines = ["=" * width, "lora_trainer fast-path benchmark (CPU)", *bt.environment(raw), "-" * width]
    lines.append(f"Training step, s/step: pooled median of {raw['steps'] - bt.WARMUP_STEPS} timed steps x "
                 f"{raw['rounds']} round(s) per policy, in lockstep; [CPU s/step]; speed-ups: kohya-equiv. "
                 f"(fp32) / row and kohya-equiv. bf16 / row")
    header = f"{'':22s}" + "".join(f"{p + ' wall':>15s}{'[CPU]':>7s}{'vs kohya':>9s}{'vs k.bf16':>10s}"
                                    for p in POLICIES)
    lines.append(header + f"{'vs eager':>9s}{'peak MiB':>9s}")

    def pooled(policy, name, key="step_seconds"):
        return bt.median([s for run in results[policy][name] for s in run[key]])

    def per_round(policy, reference):
        return [bt.median(k["step_seconds"]) / bt.median(f["step_seconds"])
                for k, f in zip(results[policy][reference], results[policy]["fast path"])]

    rows = [name for name in VARIANTS if results[POLICIES[0]].get(name)]   # older files lack some rows
    references = [name for name in (KOHYA, KOHYA_BF16) if name in rows]

    def speedup(policy, reference, wall, width):
        return f"{pooled(policy, reference) / wall:>{width - 1}.2f}x" if reference in rows else f"{'-':>{width}s}"

    for name in rows:
        cells = ""
        for policy in POLICIES:
            wall, cpu = pooled(policy, name), pooled(policy, name, "step_cpu_seconds")
            cells += f"{wall:>13.3f} s{cpu:>7.3f}{speedup(policy, KOHYA, wall, 9)}{speedup(policy, KOHYA_BF16, wall, 10)}"
        vs_eager = bt.median([pooled(p, "eager") / pooled(p, name) for p in POLICIES])
        peak = bt.median([run["child_peak_rss_mib"] for p in POLICIES for run in results[p][name]])
        lines.append(f"  {name:20s}{cells}{vs_eager:>8.2f}x{peak:>9.0f}")
    for reference in references:
        lines.append(f"  per-round medians of the fast path vs {reference} (wall): " + ", ".join(
            f"{p} " + "/".join(f"{r:.2f}x" for r in per_round(p, reference)) for p in POLICIES))
    kernels = raw.get("optimizer_kernels")
    if kernels:
        lines.append(f"  AdamW alone over the {kernels[POLICIES[0]]['tensors']} LoRA tensors, ms/step: " + ", ".join(
            f"{p} " + " / ".join(f"{k} {kernels[p][k]:.1f}" for k in ("loop", "foreach", "fused")) for p in POLICIES)
            + " (kohya-equiv.: loop; eager: foreach, bit-identical to the loop; fast path: fused)")
    lines.append("-" * width)
    labels = {KOHYA: "kohya's default precision", KOHYA_BF16: "kohya at the fast path's precision"}
    for reference in references:
        label = labels[reference]
        worst = min(pooled(p, reference) / pooled(p, "fast path") for p in POLICIES)
        worst_round = min(r for p in POLICIES for r in per_round(p, reference))
        lines.append(f"Target: fast path >= {TARGET_VS_KOHYA}x {reference} ({label}) under both wait policies: "
                     f"{worst:.2f}x at worst (pooled), {worst_round:.2f}x in the worst round -> "
                     f"{'MET' if worst >= TARGET_VS_KOHYA else 'NOT MET'}")
    if checks:
        within = checks["cosine"] >= TOLERANCE_COSINE and checks["rel_norm"] <= TOLERANCE_REL_NORM
        lines.append(f"Fast path vs eager after {CHECK_STEPS} steps, the learned (up) weights: cosine "
                     f"{checks['cosine']:.4f} (tolerance >= {TOLERANCE_COSINE}), |difference| / |eager| "
                     f"{checks['rel_norm']:.1%} (<= {TOLERANCE_REL_NORM:.0%}) -> {'WITHIN' if within else 'OUTSIDE'};"
                     f" largest element-wise difference {checks['eager_vs_fast_abs']:.1e} "
                     f"(largest weight {checks['eager_largest']:.1e})")
        lines.append("Fast path stopped at step %d, resumed in a new process vs uninterrupted: %s" % (
            CHECK_STEPS // 2, "byte-identical (LoRA, optimizer)" if checks["resume_identical"] else "DIFFERENT"))
    lines.append(f"total benchmark time {raw['elapsed']:.0f} s")
    lines.append("=" * width)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round per wait policy, 8 steps")
    parser.add_argument("--rounds", type=int, help="rounds per wait policy")
    parser.add_argument("--steps", type=int, help="steps per run (the first %d not timed)" % bt.WARMUP_STEPS)
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness pass")
    parser.add_argument("--recheck", metavar="JSON", help="with --workdir of a kept run: redo the comparison "
                        "of its correctness pass and print the table of JSON with it")
    bt.add_shared_options(parser)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="timed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "prepare":
        return bt.main(["--worker", "prepare", "--workdir", args.workdir])
    if args.worker:
        run_worker(args)
        return 0
    if args.render or args.recheck:
        raw = json.loads(Path(args.render or args.recheck).read_text(encoding="utf-8"))
        if args.recheck:
            raw["checks"] = start(Path(args.workdir), "compare", 0, "compare", "PASSIVE", False).finish()
            Path(args.recheck).write_text(json.dumps(raw, indent=1), encoding="utf-8")
        print(render(raw))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
