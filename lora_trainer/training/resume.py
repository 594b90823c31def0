"""What a checkpoint holds, and the decision whether (and how) a run may continue from one.

Files in a checkpoint folder (see storage.checkpoints for atomicity and checksums):
  lora.safetensors       adapter weights, keyed by parameter name
  optimizer.safetensors  optimizer tensors keyed by parameter name (never by position)
  rng.safetensors        torch CPU/CUDA generator states
  state.json             counters, losses, scheduler, scaler, RNG (python/numpy), hashes, settings
"""
from __future__ import annotations

from ..config.load import config_diff, config_to_dict
from ..contracts.backbone import Backbone
from ..storage import train_state


class ResumeRefused(RuntimeError):
    pass


def run_facts(cfg, plan, world_size: int, dataset_manifest: str, backbone: Backbone, lora_path) -> dict:
    """What a checkpoint stores beside the training state (training/state.py): the facts a resume
    must match or adapt to."""
    return {
        "format": 1,
        "total_steps": plan.total_steps,
        "batches_per_step": plan.accumulation,
        "world_size": world_size,
        "config": config_to_dict(cfg),
        "dataset_manifest": dataset_manifest,
        "base_model": backbone.identity(),
        "determinism": train_state.determinism_settings(),
        "runtime": backbone.runtime_settings(),
        "lora_file": str(lora_path),
    }


def check_compatible(state: dict, current: dict, cfg, force: bool) -> list[str]:
    """Refuse a resume that would silently train something else; return notes about harmless changes.
    `state`: the checkpoint's; `current`: this run's `run_facts`."""
    problems: list[str] = []
    forced: list[str] = []
    notes: list[str] = []
    model = current["base_model"]
    if state.get("base_model", {}).get("hash") != model.get("hash"):
        problems.append(f"base model: the checkpoint was trained on {state['base_model'].get('source')} "
                        f"(fingerprint {state['base_model'].get('hash')}), the loaded model is "
                        f"{model.get('source')} ({model.get('hash')})")
    if state.get("dataset_manifest") != current["dataset_manifest"]:
        forced.append("dataset: images or captions changed since the checkpoint")
    for change in config_diff(state.get("config", {}), cfg):
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
