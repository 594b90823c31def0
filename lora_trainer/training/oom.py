"""Out-of-memory recovery: the most common way a run on a consumer GPU dies.

Ladder: halve the micro-batch (the step keeps its samples, so the effective batch and the maths stay
the same), and at micro-batch 1 turn on gradient checkpointing; after that, stop with the levers
that are left.
"""
from __future__ import annotations

import gc

import torch


class OutOfMemoryStop(RuntimeError):
    pass


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def next_oom_action(micro_batch_size: int, checkpointing_on: bool) -> str:
    if micro_batch_size > 1:
        return "halve"
    if not checkpointing_on:
        return "checkpointing"
    return "stop"


def oom_advice(cfg) -> str:
    levers = [f"lower resolution (now {cfg.resolution})", f"lower lora_rank (now {cfg.lora_rank})"]
    if cfg.train_text_encoder:
        levers.append("set train_text_encoder: false")
    if cfg.optimizer != "adamw8bit":
        levers.append("optimizer: adamw8bit (needs bitsandbytes)")
    if cfg.mixed_precision == "no":
        levers.append("mixed_precision: fp16 or bf16")
    return ("Out of memory even at micro-batch 1 with gradient checkpointing. The last checkpoint is "
            "intact; to go on, change one of: " + "; ".join(levers) + ".")
