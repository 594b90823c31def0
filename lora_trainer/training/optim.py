"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch


class OptimizerUnavailable(RuntimeError):
    pass


def build_optimizer(name: str, param_groups: list[dict], weight_decay: float, fused: bool = False):
    """``fused``: torch's one-kernel AdamW (CPU and CUDA), about 2x faster than the multi-tensor
    one on this project's CPU benchmark but rounding differently in the last bit, so it belongs to
    the fast path (``compile: true``), whose results are already "within tolerance of eager".
    Otherwise the multi-tensor (foreach) AdamW: bit-identical to torch's per-parameter loop (a test
    holds it to that), which is what earlier runs and their checkpoints used, and ~1.5x faster on
    the CPU, where torch would pick the loop by default."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay, foreach=not fused, fused=fused)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: only on CUDA machines
        except Exception as e:
            raise OptimizerUnavailable(
                "optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                f"import failed: {e}. Use optimizer: adamw instead.") from e
        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    raise OptimizerUnavailable(f"optimizer: unknown value '{name}' (adamw or adamw8bit)")


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler: unknown value '{kind}'")


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    # LambdaLR's state is JSON-serialisable (last_epoch, base_lrs…), which the checkpoint relies on.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind, warmup_steps, total_steps))
