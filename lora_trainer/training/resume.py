"""What a checkpoint holds, and the decision whether (and how) a run may continue from one.

Files in a checkpoint folder (see storage.checkpoints for atomicity and checksums):
  lora.safetensors       adapter weights, keyed by parameter name
  optimizer.safetensors  optimizer tensors keyed by parameter name (never by position)
  rng.safetensors        torch CPU/CUDA generator states
  state.json             counters, losses, scheduler, scaler, RNG (python/numpy), hashes, settings
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config.load import config_diff, config_to_dict
from ..storage import train_state


class ResumeRefused(RuntimeError):
    pass


@dataclass
class Position:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0   # index of the next batch to train inside `epoch`
    samples_seen: int = 0


def capture(trainer) -> tuple[dict, dict]:
    names = [n for n, _ in trainer.named_params]
    lora = {n: p.detach().cpu().contiguous() for n, p in trainer.named_params}
    opt_tensors, opt_json = train_state.optimizer_state_to_files(trainer.optimizer, names)
    rng_tensors, rng_json = train_state.capture_rng_state()
    state = {
        "format": 1,
        "position": dataclasses.asdict(trainer.position),
        "loss": trainer.last_loss,
        "recent_losses": trainer.recent_losses[-200:],
        "total_steps": trainer.plan.total_steps,
        "batches_per_step": trainer.plan.accumulation,
        "world_size": trainer.dist.world_size,
        "micro_batch_size": trainer.micro_batch_size,
        "scheduler": train_state.scheduler_state_to_json(trainer.scheduler),
        "grad_scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "optimizer": opt_json,
        "rng": rng_json,
        "config": config_to_dict(trainer.cfg),
        "dataset_manifest": trainer.index.manifest_hash(),
        "base_model": trainer.backbone.identity(),
        "determinism": train_state.determinism_settings(),
        "runtime": trainer.backbone.runtime_settings(),
        "started_at": trainer.started_at,
        "lora_file": str(trainer.lora_path),
    }
    return {"lora": lora, "optimizer": opt_tensors, "rng": rng_tensors}, state


def check_compatible(state: dict, trainer, force: bool) -> list[str]:
    """Refuse a resume that would silently train something else; return notes about harmless changes."""
    problems: list[str] = []
    forced: list[str] = []
    notes: list[str] = []
    if state.get("base_model", {}).get("hash") != trainer.backbone.identity().get("hash"):
        problems.append(f"base model: the checkpoint was trained on {state['base_model'].get('source')} "
                        f"(fingerprint {state['base_model'].get('hash')}), the loaded model is "
                        f"{trainer.backbone.identity().get('source')} ({trainer.backbone.identity().get('hash')})")
    if state.get("dataset_manifest") != trainer.index.manifest_hash():
        forced.append("dataset: images or captions changed since the checkpoint")
    for change in config_diff(state.get("config", {}), trainer.cfg):
        text = f"{change.key}: {change.old!r} -> {change.new!r}"
        {"fixed": problems, "force": forced}.get(change.resume, notes).append(text)
    if problems:
        raise ResumeRefused("cannot resume: these changes make the checkpoint unusable:\n  - "
                            + "\n  - ".join(problems)
                            + "\nStart a new run instead: --no-resume on the command line, resume: false in "
                              "the config, or the tab's Resume box off (or another output name); the old "
                              "run folder is kept.")
    if forced and not force:
        raise ResumeRefused("refusing to resume because these changed since the checkpoint:\n  - "
                            + "\n  - ".join(forced)
                            + "\nTo continue with the new values: --force-resume on the command line, the "
                              "tab's 'Continue the run with changed settings' box, or \"force_resume\": true "
                              "in the WebUI's JSON API. To start over: --no-resume, resume: false in the "
                              "config, or the tab's Resume box off.")
    return [f"continuing with changed {x}" for x in forced] + [f"changed {x}" for x in notes]


def restore(trainer, tensors: dict, state: dict) -> None:
    notes = train_state.apply_determinism_settings(state.get("determinism", {}))
    for note in notes:
        trainer.say(note)
    for name, param in trainer.named_params:
        param.data.copy_(tensors["lora"][name])
    names = [n for n, _ in trainer.named_params]
    train_state.load_optimizer_state(trainer.optimizer, names, tensors["optimizer"], state["optimizer"])
    train_state.load_scheduler_state(trainer.scheduler, state["scheduler"])
    if trainer.scaler is not None and state.get("grad_scaler"):
        trainer.scaler.load_state_dict(state["grad_scaler"])
    train_state.restore_rng_state(tensors["rng"], state["rng"])
    trainer.position = Position(**state["position"])
    trainer.last_loss = state.get("loss")
    trainer.recent_losses = list(state.get("recent_losses", []))
    trainer.micro_batch_size = state.get("micro_batch_size", trainer.micro_batch_size)
    trainer.started_at = state.get("started_at", trainer.started_at)
