"""One low-rank adapter for one Linear or Conv2d layer (kohya's LoRA / LoCon math).

    y = W x + multiplier * (alpha / rank) * up(down(x))

`up` starts at zero so a fresh adapter leaves the model's output unchanged. The single scaling rule
(alpha / rank, then the user's multiplier) is the one the WebUI, kohya and diffusers apply when they
load the file, so what we train is what they render.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .host import LinearSlot


class LoRAAdapter(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  dilation=base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, (nn.Linear, LinearSlot)):   # a slot: e.g. MultiheadAttention's q (lora.mha)
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d, not {type(base).__name__}")
        # kohya's initialisation: down ~ kaiming-uniform, up = 0
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        # alpha is saved in the file as a 0-dim tensor; a buffer keeps it in state_dict()
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))) * (self.multiplier * self.scale)

    def linear_delta(self) -> torch.Tensor:
        """The Linear weight update at the current multiplier, differentiable: for hosts that add it
        into a fused weight in their forward (lora.mha)."""
        return (self.up.weight @ self.down.weight) * (self.multiplier * self.scale)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The weight update this adapter adds at its current multiplier (for merging)."""
        up, down = self.up.weight, self.down.weight
        if not self.is_conv:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(-1).unsqueeze(-1)
        else:  # 3x3 LoCon: up is 1x1, so the product is a per-position mix of down's kernels
            delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        return delta * (self.multiplier * self.scale)
