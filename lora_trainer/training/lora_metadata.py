"""The metadata written into the LoRA file: what kohya writes and the WebUI / Forge / ComfyUI read.

The WebUI uses `ss_output_name` as the alias in `<lora:alias:w>` (so it is the file's own stem: a
snapshot must not steal the final file's alias), `ss_base_model_version` / `modelspec.architecture`
to show the LoRA only for matching models, and `ss_tag_frequency` for the card's tag list.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config.public import shareable_config


def _dataset_dirs(index) -> dict:
    """kohya's `{"<repeats>_<folder>": {"n_repeats", "img_count"}}`, keyed like `ss_tag_frequency`."""
    dirs: dict[str, dict] = {}
    for r in index.records:
        d = dirs.setdefault(index.group_name(r), {"n_repeats": r.repeats, "img_count": 0})
        d["img_count"] += 1
    return dirs


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(float(value))


def network_metadata(network) -> dict:
    """ss_network_module / _dim / _alpha / _args read from the adapters as built (after
    init_lora_from too), never re-derived from the config: what the file's tensors say."""
    plain = [a for n, a in sorted(network.adapters.items()) if not network.targets[n].is_conv3x3]
    convs = [a for n, a in sorted(network.adapters.items()) if network.targets[n].is_conv3x3]
    first = (plain or convs)[0]
    args = first.network_args()
    if convs:
        args.update(conv_dim=str(convs[0].rank), conv_alpha=_number(float(convs[0].alpha)))
    return {
        "ss_network_module": first.network_module(),
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": str(float(first.alpha)),
        "ss_network_args": json.dumps(args) if args else None,
    }


def lora_metadata(trainer, output_name: str) -> dict:
    cfg, backbone, plan = trainer.cfg, trainer.backbone, trainer.plan
    family = backbone.family
    identity = backbone.identity()
    res = f"({cfg.resolution}, {cfg.resolution})"
    meta = {
        "ss_output_name": output_name,
        **network_metadata(trainer.network),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.kohya_v2),
        "ss_sd_model_name": Path(identity.get("source", "")).name,
        "ss_sd_model_hash": identity.get("hash", ""),
        "ss_resolution": res,
        "ss_num_train_images": str(trainer.index.num_samples),
        "ss_num_reg_images": "0",
        "ss_tag_frequency": json.dumps(trainer.index.tag_frequency()),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(trainer.index)),
        "ss_training_started_at": str(int(trainer.state.started_at)),
        "ss_training_finished_at": str(int(time.time())),
        "ss_steps": str(trainer.state.position.global_step),
        "ss_epoch": str(trainer.state.position.epoch),
        "ss_num_epochs": str(plan.epochs_to_run),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_total_batch_size": str(plan.effective_batch),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset) if cfg.noise_offset else None,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma) if cfg.min_snr_gamma else None,
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_bucket_info": json.dumps(trainer.task.buckets.metadata(trainer.index)) if cfg.enable_bucket else None,
        "ss_min_bucket_reso": str(trainer.task.buckets.spec.min_reso) if cfg.enable_bucket else None,
        "ss_max_bucket_reso": str(trainer.task.buckets.spec.max_reso) if cfg.enable_bucket else None,
        "ss_clip_skip": "None",
        "ss_prediction_type": backbone.prediction_type,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        # no local paths (see config/public.py); the full config stays in <run_dir>/config.yaml
        "lora_trainer_config": json.dumps(shareable_config(cfg), default=str),
    }
    if cfg.trigger_word:
        meta["modelspec.trigger_phrase"] = cfg.trigger_word
    return {k: v for k, v in meta.items() if v is not None}
