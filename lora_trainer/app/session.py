"""Headless entry point: config -> data -> backbone -> Trainer. The CLI and the standalone UI call
`train_from_config`; the WebUI builds its own backbone and calls `run_training` directly."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..config.load import cfg_warnings, write_effective_config
from ..monitor.logfile import attach_run_log
from ..monitor.run_log import run_monitors
from ..monitor import system
from ..monitor.system import PhasePeaks
from ..storage.run_lock import hold_run_folder
from ..tasks import task_for
from ..contracts.backbone import Backbone
from ..training.control import TrainingControl
from ..training.distributed import SINGLE, DistContext, device_for, init_from_environment, shutdown
from ..training.outputs import carry_run_ids, ensure_run_id, preflight
from ..training.trainer import Trainer, TrainResult

log = logging.getLogger("lora_trainer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: '{name}' but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def base_dtype(cfg, device: torch.device) -> torch.dtype:
    """The frozen base weights' dtype (the LoRA itself stays fp32). 'auto' follows mixed_precision
    on every device: bf16 on the CPU halves the model's memory too (fp16 is CUDA-only, refused
    with its field named by the trainer)."""
    if cfg.base_dtype != "auto":
        return _DTYPES[cfg.base_dtype]
    return _DTYPES.get(cfg.mixed_precision, torch.float32)


def precision_advice(cfg, device: torch.device) -> str | None:
    """bf16 on a CPU that emulates it trains slower than fp32 (it still halves the memory)."""
    if cfg.mixed_precision != "bf16" or device.type != "cpu" or system.cpu_native_bf16() != "":
        return None
    return ("mixed_precision: bf16 on this CPU, which has no native bf16 (AMX or AVX512-BF16): steps are "
            "emulated and slower than fp32. It still halves the model's memory; for speed set "
            "mixed_precision: no")


def index_dataset(cfg):
    return task_for(cfg.task_type).index_dataset(cfg)


def set_aside_old_run(run_dir: Path) -> Path | None:
    """`resume: false` on a folder that holds a run: keep the old run under a new name (the new
    run may replace the LoRA the old one wrote: see outputs.carry_run_ids)."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    target = run_dir.with_name(f"{run_dir.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(run_dir), str(target))
    carry_run_ids(target, run_dir)
    return target


def _holding_run_folder(cfg, dist: DistContext):
    """Rank 0 holds the run folder's lock (storage/run_lock.py); the other ranks are its helpers."""
    return hold_run_folder(cfg.run_dir) if dist.is_main else contextlib.nullcontext()


def run_training(cfg, backbone: Backbone, control=None, observers=(), previewer=None, force_resume=False,
                 index=None, dist: DistContext = SINGLE, data_findings=None, phases=None) -> TrainResult:
    """`data_findings`: the data check's findings when the caller already ran it (then they are
    only logged here, not computed again)."""
    with _holding_run_folder(cfg, dist):
        return _run_training_locked(cfg, backbone, control, observers, previewer, force_resume, index,
                                    dist, data_findings, phases)


def _run_training_locked(cfg, backbone, control, observers, previewer, force_resume, index, dist,
                         data_findings, phases) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    task = task_for(cfg.task_type)
    if dist.is_main:
        preflight(cfg)
    if not cfg.resume and dist.is_main:
        moved = set_aside_old_run(run_dir)
        if moved:
            log.info("resume is off: the previous run was moved to %s", moved)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        ensure_run_id(run_dir)
    dist.barrier()
    # only rank 0 writes train.log, the effective config, cards and monitors
    with attach_run_log(run_dir) if dist.is_main else contextlib.nullcontext():
        try:
            for w in cfg_warnings(cfg):
                log.warning(w)
            index = index or index_dataset(cfg)
            for w in index.warnings:
                log.warning(w)
            if cfg.check_data:
                task.check_data(index, cfg, log if dist.is_main else None, data_findings)
            advice = precision_advice(cfg, backbone.device)   # after the data check, which needs no model
            if advice:
                log.warning(advice)
            if dist.is_main:
                write_effective_config(cfg, run_dir)
            if previewer is None:   # fails early on a bad prompt or a LoRA it names that is missing
                previewer = task.previewer(cfg)
            if dist.is_main:
                observers = [*observers, *task.observers(cfg, backbone, index)]
            monitoring: contextlib.AbstractContextManager[list] = (
                run_monitors(cfg, backbone, index) if dist.is_main else contextlib.nullcontext([]))
            with monitoring as monitors:  # train.log lines, TensorBoard
                if phases is None:   # (the headless session passes the one that measured the model load)
                    phases = PhasePeaks(backbone.device)
                    phases.enter("setup")
                trainer = Trainer(cfg, backbone, index, control or TrainingControl(),
                                  [*monitors, *observers], previewer, force_resume, dist, phases=phases,
                                  task=task.training(cfg, backbone, index))
                return trainer.run()
        except Exception:
            # the stack goes to train.log only; the console shows the message (see cli)
            log.error("training failed", exc_info=True, extra={"file_only": True})
            raise


def train_from_config(cfg, control=None, observers=(), force_resume=False) -> TrainResult:
    # never reach for a model hub from a headless run (set here, not at import: inside the WebUI
    # this module is imported too, and the WebUI's own downloads are not ours to switch off)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dist = init_from_environment(device.type)
    device = device_for(dist, device)
    task = task_for(cfg.task_type)
    try:
        with _holding_run_folder(cfg, dist):
            if dist.is_main:   # unwritable folders, someone else's LoRA: before the model load
                preflight(cfg)
            index = task.index_dataset(cfg)  # data errors before the (slow) model load
            # errors stop the run here, before the model load; run_training logs the warnings into train.log
            findings = task.check_data(index, cfg) if cfg.check_data else None
            phases = PhasePeaks(device)
            phases.enter("load")
            backbone = task.load_backbone(cfg, device, base_dtype(cfg, device))
            phases.enter("setup")   # LoRA, optimizer, resume check: until the caches are filled
            return run_training(cfg, backbone, control, observers if dist.is_main else (), None, force_resume,
                                index=index, dist=dist, data_findings=findings, phases=phases)
    finally:
        shutdown(dist)

