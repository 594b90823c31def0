"""Real-size benchmark: the headless trainer on random-weight checkpoints of the real SD1.5 and SDXL
shapes (fp16 single files, LDM/SGM layout, ~2.1 GB and ~6.9 GB), on the CPU.

    .venv-bench/bin/python benchmarks/bench_realsize.py --family sd1     # ~10 GB of free RAM
    .venv-bench/bin/python benchmarks/bench_realsize.py --family sdxl    # ~18 GB of free RAM
    options: --steps N (3), --resolution PX, --base-dtype auto|fp32|bf16, --compile, --json FILE, --build-only
    .venv-bench/bin/python benchmarks/bench_realsize.py --family sd1 --levers --steps 5
        # the fast-path levers one after another on the same file: fp32, compile, bf16, bf16 + compile
    .venv-bench/bin/python benchmarks/bench_realsize.py --family sd1 --memory-formats --steps 3
        # channels-last against NCHW, alternating step by step in one process (bare UNet + LoRA step)

The files are built once from the shipped configs (lora_trainer/backbones/configs/sd1, sdxl) and
kept in $LORA_TRAINER_BENCH_MODELS (default: ~/.cache/lora_trainer/bench-models), never in the
repository. They are written tensor by tensor with random values (no model is ever materialised,
so building the SDXL file needs a few hundred MB, not 14 GB). Each run is one subprocess (this file
with --worker) calling the real `train_from_config` with a fresh latent/text cache folder; the
parent reads the per-phase peaks and times from the run's train.log ("Memory per phase" line), the
whole process's peak from os.wait4, and the step times from a TrainingObserver.

Targets printed (issue #19): load-phase peak <= 1.2 x the weights in their training dtype; whole-run
peak <= weights + 1.5 GB (512 px, batch 1, gradient checkpointing); SDXL with a 16-bit base within
16 GB; time to first step <= load + caching + 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30
RESULT_PREFIX = "BENCH_RESULT "
DEFAULTS = {"sd1": dict(resolution=512, base_dtype="fp32"), "sdxl": dict(resolution=512, base_dtype="bf16")}


def models_folder() -> Path:
    folder = os.environ.get("LORA_TRAINER_BENCH_MODELS") or Path.home() / ".cache" / "lora_trainer" / "bench-models"
    return Path(folder)


# ---- building the files ------------------------------------------------------------------------------

def _meta_checkpoint(family: str) -> dict:
    """LDM/SGM key -> meta tensor of the real-size model (shipped configs), no data."""
    import torch

    from lora_trainer.backbones.ldm_keys import components_to_ldm, layout_for
    from lora_trainer.backbones.tiny import build_models_from_configs
    from lora_trainer.backbones.tiny_configs import SHIPPED_CONFIG_DIRS, load_config_dicts

    configs = load_config_dicts(SHIPPED_CONFIG_DIRS[family])
    with torch.device("meta"):
        models = build_models_from_configs(configs, rerandomise_zeros=False)
    extras = {"text_encoder_2": {"logit_scale": torch.empty((), device="meta")}} if family == "sdxl" else None
    state_dicts = {name: model.state_dict() for name, model in models.items()}
    return components_to_ldm(state_dicts, configs, layout_for(family), extras)


def _random_values(key: str, shape, generator):
    """Values that keep a forward pass finite and trainable: 1-D weights (all of them are norm
    scales: GroupNorm/LayerNorm, named `in_layers.0` etc. in the LDM layout) 1, biases 0, other
    weights ~ N(0, 1/fan_in)."""
    import torch

    if len(shape) <= 1:
        return torch.ones(shape) if key.endswith(".weight") and len(shape) == 1 else torch.zeros(shape)
    fan_in = 1
    for side in shape[1:]:
        fan_in *= side
    return torch.randn(shape, generator=generator) / fan_in ** 0.5


def build_file(family: str) -> Path:
    """The real-size fp16 single file of ``family`` (written once, atomically renamed into place)."""
    import torch

    path = models_folder() / f"realsize-{family}-fp16-v2.safetensors"   # v2: norm scales 1
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = _meta_checkpoint(family)
    header, offset = {}, 0
    for key, tensor in meta.items():
        dtype = "I64" if not tensor.is_floating_point() else "F16"
        nbytes = tensor.numel() * (8 if dtype == "I64" else 2)
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "note": "random weights, real-size benchmark"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(0)
    temp = path.with_suffix(".tmp")
    t0 = time.perf_counter()
    with open(temp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, tensor in meta.items():
            if tensor.is_floating_point():
                data = _random_values(key, tuple(tensor.shape), generator).to(torch.float16)
            else:   # position_ids
                data = torch.arange(tensor.shape[-1], dtype=torch.int64).expand(tuple(tensor.shape)).contiguous()
            f.write(data.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    print(f"built {path} ({path.stat().st_size / GIB:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ---- one run (worker process) ------------------------------------------------------------------------

def worker(args) -> None:
    t0 = time.perf_counter()
    from lora_trainer.app.run_config import load_run_config
    from lora_trainer.training.control import TrainingObserver
    from lora_trainer.app.session import train_from_config

    class Steps(TrainingObserver):
        def __init__(self):
            self.done_at, self.cpu_at = [], []
            self.started_at = None

        def on_start(self, info):   # caches filled: the first step begins
            self.started_at = time.perf_counter() - t0

        def on_step(self, report):
            self.done_at.append(time.perf_counter() - t0)
            self.cpu_at.append(time.process_time())

    imported = time.perf_counter() - t0
    steps = Steps()
    result = train_from_config(load_run_config(args.worker), observers=[steps])
    log_text = (Path(result.run_dir) / "logs" / "train.log").read_text()
    print(RESULT_PREFIX + json.dumps({"status": result.status, "imports_s": imported, "steps_at": steps.done_at,
                                      "first_step_begins_s": steps.started_at,
                                      "cpu_s_per_step": [b - a for a, b in zip(steps.cpu_at, steps.cpu_at[1:])],
                                      "phases": _phases_from_log(log_text)}), flush=True)


def _phases_from_log(text: str) -> dict:
    line = [ln for ln in text.splitlines() if "Memory per phase" in ln][-1]
    return {name: {"peak_gib": float(peak), "start_gib": float(start), "seconds": float(seconds)}
            for name, peak, start, seconds in re.findall(r"(\w+) ([\d.]+) GiB \(from ([\d.]+)\) in ([\d.]+) s", line)}


# ---- the parent --------------------------------------------------------------------------------------

def run_family(family: str, steps: int, resolution: int, base_dtype: str, compile: bool = False) -> dict:
    from lora_trainer.tools.demo import write_dataset

    model = build_file(family)
    work = Path(tempfile.mkdtemp(prefix=f"bench-realsize-{family}-"))
    data = write_dataset(work / "data", count=max(2, steps), size=resolution)
    mixed = "bf16" if base_dtype in ("bf16", "auto") and family == "sdxl" else ("bf16" if base_dtype == "bf16" else "no")
    config = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(work / "out"),
              "output_name": f"bench-{family}", "resolution": resolution, "batch_size": 1, "lora_rank": 8,
              "max_train_steps": steps, "gradient_checkpointing": True, "save_steps": 0,
              "base_dtype": base_dtype, "mixed_precision": mixed, "write_card": False,
              "tensorboard": False, "num_threads": 2, "log_every_n_steps": 1, "compile": compile}
    config_path = work / "config.yaml"
    config_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    env = dict(os.environ, LORA_TRAINER_CACHE=str(work / "cache"), OMP_NUM_THREADS="2",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(config_path)], env=env,
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    line = [ln for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    if status != 0 or not line:
        raise SystemExit(f"the {family} run failed (status {status}); see {work}")
    measured = json.loads(line[-1][len(RESULT_PREFIX):])
    cache = {name: _folder_bytes(work / "cache" / name) for name in ("latents", "text")}
    return dict(family=family, model=str(model), model_gib=model.stat().st_size / GIB, resolution=resolution, steps=steps,
                compile=compile,
                base_dtype=base_dtype, mixed_precision=mixed, wall_s=wall, process_peak_gib=usage.ru_maxrss * 1024 / GIB,
                cache_bytes=cache, workdir=str(work), **measured)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def weights_gib(model: str, base_dtype: str) -> float:
    """The loaded weights: UNet + text encoders in the base dtype, the VAE in fp32 (counts from the header)."""
    from lora_trainer.app.memory_estimate import parameter_counts

    counts = parameter_counts(model)
    size = 4 if base_dtype == "fp32" else 2
    return ((counts["unet"] + counts["text_encoders"]) * size + counts["vae"] * 4) / GIB


def report(r: dict) -> str:
    phases = r["phases"]
    weights = weights_gib(r["model"], r["base_dtype"] if r["base_dtype"] != "auto" else "fp32")
    first = r["steps_at"][0]
    per_step = [b - a for a, b in zip(r["steps_at"], r["steps_at"][1:])]
    load_s, caching, setup = (phases.get(k, {}).get("seconds", 0.0) for k in ("load", "caching", "setup"))
    lines = [f"== {r['family']}: {r['model_gib']:.2f} GiB fp16 file, base {r['base_dtype']} "
             f"(mixed_precision {r['mixed_precision']}{', compile' if r.get('compile') else ''}), "
             f"{r['resolution']} px, batch 1, rank 8, "
             f"gradient checkpointing, {r['steps']} steps, 2 threads",
             f"  time to first step {first:.1f} s from process start (the step itself included): imports "
             f"{r['imports_s']:.1f} s, load {load_s:.1f} s, set-up {setup:.1f} s, caching {caching:.1f} s, "
             f"first step {first - r['first_step_begins_s']:.1f} s" if r.get("first_step_begins_s") else
             f"  time to first step {first:.1f} s from process start: load {load_s:.1f} s, caching {caching:.1f} s",
             f"  s/step after the first: {', '.join(f'{s:.1f}' for s in per_step) or '-'} (wall); "
             f"{', '.join(f'{s:.1f}' for s in r.get('cpu_s_per_step', [])) or '-'} (process CPU time, all threads)",
             "  peak RSS per phase: " + ", ".join(f"{k} {v['peak_gib']:.2f} GiB (from {v.get('start_gib', 0):.2f}; {v['seconds']:.1f} s)"
                                                for k, v in phases.items()),
             f"  whole process peak {r['process_peak_gib']:.2f} GiB; weights in training dtype {weights:.2f} GiB",
             f"  caches: latents {r['cache_bytes']['latents'] / 1024:.0f} KiB, text {r['cache_bytes']['text'] / 1024:.0f} KiB",
             "  targets:"]
    load = phases.get("load", {})
    # what the load adds to the process (interpreter + imports were there before it began)
    lines.append(_target("load-phase peak - RSS before the load <= 1.2 x weights",
                         load.get("peak_gib", float("nan")) - load.get("start_gib", 0.0), 1.2 * weights))
    budget = 16e9 / GIB if r["family"] == "sdxl" else weights + 1.5e9 / GIB   # the GB are 10^9 bytes
    lines.append(_target(f"whole-run peak <= {'16 GB' if r['family'] == 'sdxl' else 'weights + 1.5 GB'}",
                         r["process_peak_gib"], budget))
    begins = r.get("first_step_begins_s") or (r["imports_s"] + load_s + setup + caching)
    lines.append(_target("first step begins (process start) <= 1.1 x (load + caching)", begins,
                         1.1 * (load_s + caching), unit="s"))
    return "\n".join(lines)


LEVERS = (("eager fp32", "fp32", False), ("compile", "fp32", True), ("bf16", "bf16", False),
          ("bf16 + compile", "bf16", True))


def compare_levers(family: str, steps: int, resolution: int, json_path: Path | None) -> None:
    """The fast-path levers on the real-size model, one run after another (each alone in memory).
    Steps 1-2 are not compared: the first compiles (compile) or warms the allocator (the others)."""
    if steps < 4:
        raise SystemExit("--levers needs --steps >= 4 (two warm-up steps, two or more compared)")
    results = {}
    for label, base_dtype, compile in LEVERS:
        results[label] = run_family(family, steps, resolution, base_dtype, compile)
        print(report(results[label]), flush=True)
    print(f"load average {os.getloadavg()}; shared machine: timings are distorted by other processes")
    eager = None
    for label, r in results.items():
        per_step = sorted(b - a for a, b in zip(r["steps_at"][1:], r["steps_at"][2:]))
        median = per_step[len(per_step) // 2]
        eager = eager or median
        print(f"  {label:16s} {median:7.2f} s/step (median of steps 3-{steps})  {eager / median:5.2f}x eager  "
              f"first step {r['steps_at'][0] - r['first_step_begins_s']:.0f} s  peak {r['process_peak_gib']:.2f} GiB")
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))


def compare_memory_formats(family: str, steps: int, resolution: int, base_dtype: str) -> None:
    """The channels-last lever at the real size: one process, the same UNet with a rank-8 attn-mlp
    LoRA and gradient checkpointing, batch 1, its weights and input switched between NCHW and NHWC
    before every step (the switch is not timed), so both formats meet the same background load.
    Bare forward/backward + AdamW on fixed tensors, as bench_training.py's floor."""
    import statistics

    import torch
    import torch.nn.functional as F

    from lora_trainer.backbones.diffusers_sd import load_backbone
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.lora.targets import select_targets

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    backbone = load_backbone(str(build_file(family)), device="cpu", dtype=dtype)
    backbone.freeze()
    backbone.set_gradient_checkpointing(True)
    network = LoRANetwork(select_targets(backbone.lora_targets(), "attn-mlp", False), 8)
    network.attach()
    params = [p for _, p in network.trainable_parameters(text_encoder=False)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=generator)
    cond = backbone.encode_text(["a photo"])
    formats = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    seconds: dict[str, list[float]] = {name: [] for name in formats}
    for k in range(2 * steps):
        name = ("NCHW", "NHWC")[k % 2]
        backbone.unet.to(memory_format=formats[name])
        noisy = latents.contiguous(memory_format=formats[name])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            prediction = backbone.predict(noisy, torch.tensor([500]), cond)
        F.mse_loss(prediction.float(), latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds[name].append(time.perf_counter() - start)
        print(f"  step {k // 2 + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(times[1:]) for name, times in seconds.items()}   # step 1 warms up
    print(f"load average {os.getloadavg()}; {family} {resolution} px, {base_dtype}, gradient checkpointing, "
          f"median of steps 2-{steps}: NCHW {medians['NCHW']:.2f} s, NHWC {medians['NHWC']:.2f} s "
          f"-> channels-last {medians['NCHW'] / medians['NHWC']:.2f}x")


def _target(what: str, value: float, limit: float, unit: str = "GiB") -> str:
    return f"    {what:<66} {value:8.2f} {unit} vs {limit:8.2f} {unit}  {'MET' if value <= limit else 'NOT MET'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--base-dtype", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="compile: true (the first step compiles)")
    parser.add_argument("--levers", action="store_true",
                        help="run fp32, compile, bf16 and bf16 + compile one after another and compare their steps")
    parser.add_argument("--memory-formats", action="store_true",
                        help="time NCHW against channels-last (NHWC) steps, alternating in one process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.build_only:
        print(build_file(args.family))
        return
    defaults = DEFAULTS[args.family]
    if args.memory_formats:
        return compare_memory_formats(args.family, args.steps, args.resolution or defaults["resolution"],
                                      args.base_dtype or defaults["base_dtype"])
    if args.levers:
        return compare_levers(args.family, args.steps, args.resolution or defaults["resolution"], args.json)
    result = run_family(args.family, args.steps, args.resolution or defaults["resolution"],
                        args.base_dtype or defaults["base_dtype"], args.compile)
    print(f"load average {os.getloadavg()}; shared machine: timings are distorted by other processes")
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
