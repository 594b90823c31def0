"""Multi-process training on PyTorch's own engine (torch.distributed), launched by `torchrun` or
`accelerate launch` — no home-made process manager.

Each optimizer step's batches are dealt round-robin to the ranks; every rank weights its samples
by 1 / (samples in the whole step) and the gradients are summed across ranks, so a step's gradient
is the same mean over the same samples as in one process with `world_size` times the
accumulation. Only rank 0 writes files; the others wait at barriers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_gradients(self, params) -> None:
        """All-reduce (sum) every gradient, flattened into one buffer: one collective per step."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def sum_float(self, value: float, device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def any(self, flag: bool, device) -> bool:
        """True on every rank when it is true on one (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)


SINGLE = DistContext()


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device_type: str, timeout_minutes: int = 30) -> DistContext:
    """Join the process group torchrun / accelerate prepared (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    if not launched_distributed():
        return SINGLE
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return ctx


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    if ctx.enabled and device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
