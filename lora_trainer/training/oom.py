"""Out-of-memory recovery: the most common way a run on a consumer GPU dies.

Ladder: halve the micro-batch (the step keeps its samples, so the effective batch and the maths stay
the same), and at micro-batch 1 turn on gradient checkpointing; after that, stop with the levers
that are left.
"""
from __future__ import annotations

import gc
import traceback

import torch

# How allocators word running out: CUDA/MPS say "out of memory"; torch's CPU allocator says "can't
# allocate memory" (Linux/macOS) or "not enough memory" (Windows).
_OOM_PHRASES = ("out of memory", "can't allocate memory", "not enough memory")


class OutOfMemoryStop(RuntimeError):
    pass


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, OutOfMemoryStop):   # our own verdict: never "recover" from it again
        return False
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(p in str(error).lower() for p in _OOM_PHRASES)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release_failed_step(error: BaseException, device: torch.device) -> None:
    """Free what the failed forward/backward still holds before retrying. The exception's traceback
    keeps every frame of the failed attempt alive, and with them its activations: clearing their
    locals is what lets gc/empty_cache give that memory back while we are still in the handler."""
    traceback.clear_frames(error.__traceback__)
    free_device_memory(device)


def next_oom_action(micro_batch_size: int, checkpointing_on: bool) -> str:
    if micro_batch_size > 1:
        return "halve"
    if not checkpointing_on:
        return "checkpointing"
    return "stop"


def oom_advice(cfg, where: str = "even at micro-batch 1 with gradient checkpointing",
               size_lever: str | None = None) -> str:
    """`size_lever`: the task's input-size setting (SD: resolution; causal LM: max_seq_length)."""
    levers = [size_lever or f"lower resolution (now {cfg.resolution})", f"lower lora_rank (now {cfg.lora_rank})"]
    if cfg.train_text_encoder:
        levers.append("set train_text_encoder: false")
    if cfg.optimizer != "adamw8bit":
        levers.append("optimizer: adamw8bit (needs bitsandbytes)")
    if cfg.mixed_precision == "no":
        levers.append("mixed_precision: fp16 or bf16")
    return (f"Out of memory {where}. The last checkpoint is intact; to go on, change one of: "
            + "; ".join(levers) + ".")
