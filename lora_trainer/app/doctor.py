"""`lora-trainer doctor [--config x.yaml]`: can this machine train, and how long will it take?

Without --config: the environment (python, torch, device, free memory and disk, package versions
against what lora_trainer needs, WebUI pins when run inside a WebUI). With --config: also a dry
run of the real model and data for a couple of steps in a temporary run folder that is deleted
afterwards (nothing goes to output_dir or run_dir), reporting the time per step, the peak memory
and an estimate for the whole run. Exit code 1 when something required is missing or the dry run
fails.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..training.control import TrainingObserver


class _Lazy:
    """`monitor.system` on first use: it imports torch (a second or more), and building the CLI's
    parser (every command, `--help` too) imports this module for `register`."""

    def __getattr__(self, name):
        from ..monitor import system as module
        return getattr(module, name)


system = _Lazy()

# What lora_trainer needs: (distribution, minimum version or None, when). Mirrors pyproject.toml
# (tests/test_monitor.py keeps the two equal). "always": the package imports it; "headless": only
# outside the WebUI (there the WebUI's loaded model is trained); "optional": a feature needs it.
REQUIREMENTS = [
    ("safetensors", "0.4", "always"),
    ("numpy", "1.23", "always"),
    ("pillow", "9.5", "always"),
    ("pyyaml", "6", "always"),
    ("tqdm", "4.60", "always"),
    ("diffusers", "0.27", "headless"),
    ("transformers", "4.30", "headless"),
    ("accelerate", "0.21", "headless"),
    ("tensorboard", "2.10", "optional"),
    ("gradio", "3.41.2", "optional"),   # the standalone UI (extra "ui"); the WebUI brings its own
    ("open_clip_torch", None, "optional"),
]
MIN_PYTHON = (3, 10)
DRY_RUN_STEPS = 2   # the first step pays one-time warm-up; the estimate uses the last one
GIB = 1 << 30
log = logging.getLogger("lora_trainer")


@dataclass
class Check:
    name: str
    status: str   # "ok" | "info" | "warn" | "fail" (fail = required; exit code 1)
    detail: str


# ---- versions ----------------------------------------------------------------------------------------
def version_key(text: str):
    """Comparable version; without `packaging`, the leading numbers ("2.1.0+cu121" -> (2, 1, 0))."""
    try:
        from packaging.version import Version
    except ImportError:
        numbers = []
        for piece in text.split("+")[0].split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            if not digits:
                break
            numbers.append(int(digits))
        return tuple(numbers)
    return Version(text)


def at_least(installed: str, minimum: str) -> bool:
    try:
        return version_key(installed) >= version_key(minimum)
    except Exception:   # an unparsable local version string: do not block on it
        return True


def package_check(dist: str, minimum: str | None, when: str, in_webui: bool) -> Check:
    required = when == "always" or (when == "headless" and not in_webui)
    version = system.package_version(dist)
    need = f">={minimum}" if minimum else "any version"
    if version is None:
        role = "required" if required else "optional" if when == "optional" else "not needed in the WebUI"
        return Check(dist, "fail" if required else "info", f"not installed (needs {need}; {role})")
    if minimum and not at_least(version, minimum):
        return Check(dist, "fail" if required else "warn", f"{version} is too old (needs {need})")
    return Check(dist, "ok", version)


def python_check() -> Check:
    ok = sys.version_info[:2] >= MIN_PYTHON
    wanted = ".".join(map(str, MIN_PYTHON))
    return Check("python", "ok" if ok else "fail", f"{platform.python_version()}"
                 + ("" if ok else f" (needs >= {wanted})") + f" at {sys.executable}")


# ---- device and resources ------------------------------------------------------------------------------
def torch_checks() -> list[Check]:
    try:
        import torch
    except Exception as error:
        return [Check("torch", "fail", f"cannot import torch: {error} (install torch for your GPU first)")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    checks = [Check("torch", "ok", f"{torch.__version__} ({build}, {torch.get_num_threads()} CPU threads)")]
    native_bf16 = system.cpu_native_bf16()
    if native_bf16 is not None:
        checks.append(Check("CPU bf16", "ok" if native_bf16 else "warn",
                            f"native ({native_bf16}): mixed_precision: bf16 is faster than fp32 here" if native_bf16
                            else "emulated: on the CPU, mixed_precision: bf16 saves memory but is slower than fp32"))
    if not torch.cuda.is_available():
        checks.append(Check("device", "warn", "no CUDA GPU: training runs on the CPU, slowly (real-size SD1.5 "
                            "at 512 px: tens of seconds per step; doctor --config times your run)"))
        return checks
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        vram = system.free_vram(device)
        free = f", {vram[0] / GIB:.1f} of {vram[1] / GIB:.1f} GiB VRAM free" if vram else ""
        checks.append(Check(f"cuda:{index}", "ok", f"{system.gpu_name(device)}{free}"))
    return checks


def optional_module_checks() -> list[Check]:
    """Modules found without importing them (bitsandbytes prints banners and probes CUDA on import)."""
    wanted = {"bitsandbytes": ("bitsandbytes", "optimizer: adamw8bit needs it (CUDA only)"),
              "pynvml": ("nvidia-ml-py", "GPU utilisation in train.log needs it")}
    checks = []
    for module, (dist, why) in wanted.items():
        if importlib.util.find_spec(module) is None:
            checks.append(Check(module, "info", f"not installed; {why}"))
        else:
            checks.append(Check(module, "ok", system.package_version(dist) or system.package_version(module)
                                or "installed"))
    return checks


def resource_checks(folders: list[tuple[str, Path]]) -> list[Check]:
    ram = system.free_ram()
    # whether it is enough depends on the model: `doctor --config` predicts the run's peak
    checks = [Check("RAM", "info", f"{ram / GIB:.1f} GiB available (doctor --config says whether a run fits)"
                    if ram is not None else "unknown")]
    for label, folder in folders:
        free = system.free_disk(folder)
        status = "ok" if free is None or free > GIB else "warn"
        checks.append(Check(f"disk ({label})", status,
                            f"{free / GIB:.1f} GiB free at {folder}" if free is not None else f"unknown at {folder}"))
    return checks


# ---- WebUI ----------------------------------------------------------------------------------------------
def webui_root() -> Path | None:
    """The WebUI's folder when running inside one (A1111 / Forge); None otherwise."""
    try:
        import modules.shared  # noqa: F401  (its import succeeding is the test)
    except Exception:
        return None
    try:
        from modules.paths_internal import script_path
        return Path(script_path)
    except Exception:
        import modules
        return Path(modules.__file__).resolve().parent.parent


def webui_pin_checks(root: Path) -> list[Check]:
    """The WebUI pins exact versions; a different installed version means someone (maybe an
    extension's installer) changed the WebUI's environment under it."""
    pins_file = root / "requirements_versions.txt"
    checks = [Check("WebUI", "info", str(root))]
    if not pins_file.is_file():
        return checks + [Check("WebUI pins", "info", f"no {pins_file.name} in {root}")]
    for line in pins_file.read_text(encoding="utf-8", errors="replace").splitlines():
        name, sep, pinned = line.split("#")[0].strip().partition("==")
        if not sep:
            continue
        installed = system.package_version(name.strip())
        ok = installed is not None and installed.split("+")[0] == pinned.strip()
        checks.append(Check(f"pin {name.strip()}", "ok" if ok else "warn",
                            f"WebUI pins {pinned.strip()}, installed {installed or 'nothing'}"))
    return checks


# ---- dry run --------------------------------------------------------------------------------------------
class _StepTimes(TrainingObserver):
    def __init__(self):
        self.created = time.perf_counter()
        self.prepare_seconds = 0.0   # until the first step: network setup, latents (cached to disk)
        self.seconds: list[float] = []
        self.steps_per_epoch = 0

    def on_start(self, info):
        self.prepare_seconds = time.perf_counter() - self.created
        self.steps_per_epoch = info["steps_per_epoch"]   # the trainer's own plan: not capped by the trial

    def on_step(self, report):
        self.seconds.append(report.seconds)


def trial_config(cfg, folder: Path, steps: int):
    """The user's config aimed at `folder`, for `steps` steps, with nothing extra rendered or saved
    on the way (keys another version of the schema lacks are left out)."""
    changes = dict(run_dir=str(folder / "run"), output_dir=str(folder / "output"), max_train_steps=steps,
                   save_steps=0, resume=False, save_snapshots=False, preview_prompts=[],
                   preview_every_n_steps=0, tensorboard=False, write_card=False)
    from ..config import applies_to, field_specs

    specs = field_specs()   # another task type's settings stay as they are (no "ignored" warnings)
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items()
                                       if hasattr(cfg, k) and applies_to(specs[k], cfg.task_type)})


def memory_fit_check(cfg) -> Check:
    """The run's predicted peak against what this machine has free, before anything is loaded."""
    import torch

    from ..backbones.loading import describe_model
    from .session import base_dtype, resolve_device
    from .memory_estimate import predict_memory

    device = resolve_device(cfg.device)
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(base_dtype(cfg, device), "fp32")
    family = describe_model(cfg.base_model, cfg.base_model_config).family
    prediction = predict_memory(cfg, family, dtype, device.type)
    if device.type == "cuda":
        vram = system.free_vram(device)
        available, where = (vram[0], "VRAM free") if vram else (None, "VRAM")
    else:
        available, where = system.free_ram(), "RAM available"
    if available is None:
        return Check("memory fit", "info", f"{prediction.describe()}; {where} unknown")
    detail = f"{prediction.describe()}; {available / GIB:.1f} GiB {where}"
    if prediction.peak_bytes > available:
        return Check("memory fit", "fail", f"{detail}: does not fit. Levers: base_dtype: bf16 (with "
                     "mixed_precision: bf16), gradient_checkpointing: true, a smaller resolution or batch_size")
    status = "warn" if prediction.peak_bytes > 0.9 * available else "ok"
    return Check("memory fit", status, detail + (": tight" if status == "warn" else ": fits"))


def dry_run(cfg, steps: int = DRY_RUN_STEPS) -> list[Check]:
    import torch

    from ..tasks import task_for
    from .session import base_dtype, index_dataset, resolve_device, run_training

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    index = index_dataset(cfg)
    phases = system.PhasePeaks(device)
    phases.enter("load")   # the peak counts from here: the load is part of the run's peak
    started = time.perf_counter()
    backbone = task_for(cfg.task_type).load_backbone(cfg, device, base_dtype(cfg, device))
    load_seconds = time.perf_counter() - started
    phases.enter("setup")
    times = _StepTimes()
    with tempfile.TemporaryDirectory(prefix="lora_trainer_doctor_") as folder:
        run_training(trial_config(cfg, Path(folder), steps), backbone, observers=[times], index=index,
                     phases=phases)
    total = cfg.max_train_steps or times.steps_per_epoch * cfg.epochs   # as TrainingPlan counts
    return [Check("model load", "ok", f"{load_seconds:.1f} s ({cfg.base_model})"),
            Check("data prep", "ok", f"{times.prepare_seconds:.1f} s (LoRA setup"
                  + (f", latents of {index.num_images} images; cached latents make it shorter next time)"
                     if cfg.task_type == "sd" else ")")),
            *_timing_checks(times.seconds, total, cfg if cfg.task_type == "sd" else None),
            _peak_memory_check(device, phases)]


def _timing_checks(seconds: list[float], total_steps: int, cfg=None) -> list[Check]:
    if not seconds:
        return [Check("step time", "fail", "the dry run made no training step")]
    from ..monitor.run_log import format_duration

    step = seconds[-1]
    checks = [Check("step time", "ok", f"{step:.3f} s per optimizer step"
                    + (f" (first step {seconds[0]:.3f} s, with warm-up)" if len(seconds) > 1 else ""))]
    from ..monitor.run_log import preview_cost

    previews, images = preview_cost(cfg, 0, total_steps, step) if cfg is not None else (0.0, 0)
    extra = f" + {images} preview image(s) ~{format_duration(previews)}" if images else ""
    checks.append(Check("estimate", "info", f"{total_steps} steps x {step:.3f} s = "
                        f"{format_duration(total_steps * step)}{extra} = {format_duration(total_steps * step + previews)} "
                        "(without checkpoints)"))
    return checks


def _peak_memory_check(device, phases) -> Check:
    peaks = phases.snapshot()
    if not peaks:
        return Check("peak memory", "info", "unknown on this system")
    phase, peak = max(peaks.items(), key=lambda item: item[1])
    kind = "RSS" if device.type == "cpu" else "allocated"
    detail = f"{kind} peak {peak / GIB:.2f} GiB (in {phase}); " + ", ".join(
        f"{name} {value / GIB:.2f}" for name, value in peaks.items())
    if device.type == "cuda" and (vram := system.free_vram(device)):
        detail += f" of {vram[1] / GIB:.1f} GiB"
    return Check("peak memory", "ok", detail)


# ---- report ---------------------------------------------------------------------------------------------
def environment_report(folders: list[tuple[str, Path]]) -> list[Check]:
    root = webui_root()
    checks = [python_check(), *torch_checks()]
    checks += [package_check(dist, minimum, when, root is not None) for dist, minimum, when in REQUIREMENTS]
    checks += optional_module_checks()
    checks += resource_checks(folders)
    if root is not None:
        checks += webui_pin_checks(root)
    return checks


def config_checks(cfg) -> list[Check]:
    """Requirements that only a given config has."""
    checks = []
    if cfg.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        checks.append(Check("bitsandbytes", "fail", "optimizer: adamw8bit needs it (pip install bitsandbytes)"))
    if cfg.task_type == "sd" and cfg.compile and cfg.compile_backend == "inductor":
        from ..backbones.compiled import compiler_problem
        from .session import resolve_device

        problem = compiler_problem(resolve_device(cfg.device))
        checks.append(Check("compile", "fail" if problem else "ok", f"{problem}; or set compile: false" if problem
                            else "torch.compile can build kernels here (the first step compiles for minutes)"))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"[{c.status:>4}] {c.name:<{width}}  {c.detail}" for c in checks)


def cmd_doctor(args) -> int:
    from .run_config import load_run_config

    cfg = load_run_config(args.config) if args.config else None
    folders = ([("run_dir", cfg.run_path), ("output_dir", Path(cfg.output_dir))] if cfg
               else [("cwd", Path(os.getcwd()))])
    checks = environment_report(folders)
    print(render(checks), flush=True)
    if cfg is not None and not any(c.status == "fail" for c in checks):
        checks = checks + _dry_run_report(cfg, args.steps)
    failed = [c.name for c in checks if c.status == "fail"]
    print(f"\n{len(failed)} problem(s): {', '.join(failed)}" if failed else "\nAll required checks passed.")
    return 1 if failed else 0


def _dry_run_report(cfg, steps: int) -> list[Check]:
    checks = config_checks(cfg)
    if checks:
        print(render(checks))
        return checks
    fit = _memory_fit(cfg)
    print(render([fit]), flush=True)
    if fit.status == "fail":   # a dry run would only be killed by the OS half-way through the load
        return [fit]
    print(f"\nDry run: {steps} step(s) of {cfg.base_model} on {cfg.train_data_dir} ...", flush=True)
    try:
        checks = dry_run(cfg, steps)
    except Exception as error:   # the temporary train.log is gone: --verbose shows the stack
        log.debug("dry run failed", exc_info=True)
        checks = [Check("dry run", "fail", f"{type(error).__name__}: {error} (--verbose shows where)")]
    print(render(checks))
    return [fit, *checks]


def _memory_fit(cfg) -> Check:
    if cfg.task_type != "sd":
        return Check("memory fit", "info", f"no prediction for task_type {cfg.task_type} (the dry run measures it)")
    try:
        return memory_fit_check(cfg)
    except Exception as error:   # a model doctor cannot read is reported by the dry run itself
        log.debug("memory prediction failed", exc_info=True)
        return Check("memory fit", "info", f"no prediction ({type(error).__name__}: {error})")


def register(sub) -> None:
    p = sub.add_parser("doctor", help="Check the environment; with --config, time a dry-run step.",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--config", help="Also load this config's model and data and time a dry-run training "
                                    "step (in a temporary folder; nothing is written to output_dir).")
    p.add_argument("--steps", type=_positive_int, default=DRY_RUN_STEPS,
                   help=f"Steps in the dry run (default {DRY_RUN_STEPS}: the first one includes warm-up).")
    p.set_defaults(func=cmd_doctor)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)   # argparse turns it into "invalid _positive_int value"
    return value
