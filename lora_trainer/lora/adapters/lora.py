"""LoRA and LoCon (kohya's math): delta = up @ down, scaled by alpha / rank.

File keys `lora_down.weight`, `lora_up.weight`, `alpha` (+ `dora_scale`). On a 3x3 convolution
(LoCon) `down` is a conv with the layer's kernel and `up` a 1x1 conv, as kohya writes them.
`up` starts at zero so a fresh adapter leaves the model's output unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, AdapterSpec, file_alpha, input_for


class LoRAAdapter(Adapter):
    kind = "lora"
    file_keys = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}
    signature = (("lora_down.weight", "lora_up.weight"),)
    down: nn.Conv2d | nn.Linear
    up: nn.Conv2d | nn.Linear

    def __init__(self, base, spec: AdapterSpec):
        super().__init__(base, spec)
        rank = spec.rank
        if self.is_conv:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  dilation=base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(self.shape[1], rank, bias=False)
            self.up = nn.Linear(rank, self.shape[0], bias=False)
        # kohya's initialisation: down ~ kaiming-uniform, up = 0
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self._add_dora(spec)

    def updown(self) -> torch.Tensor:
        up, down = self.up.weight, self.down.weight
        if not self.is_conv:
            return up @ down
        if down.shape[2:] == (1, 1):
            return (up.flatten(1) @ down.flatten(1)).unsqueeze(-1).unsqueeze(-1)
        # 3x3 LoCon: up is 1x1, so the product is a per-position mix of down's kernels
        return torch.einsum("or,rihw->oihw", up.flatten(1), down)

    def delta(self) -> torch.Tensor:
        if self.has_dora:
            return super().delta()
        return self.updown() * (self.multiplier * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_dora:   # DoRA needs the merged weight's norms: no low-rank shortcut
            return super().forward(x)
        return self.up(self.down(input_for(x, self.down.weight.dtype))) * (self.multiplier * self.scale)

    def zero_factor(self) -> torch.Tensor:
        return self.up.weight

    def network_module(self) -> str:
        # plain LoRA/LoCon is kohya's own module; DoRA only exists in LyCORIS (algo "lora" + dora_wd)
        return super().network_module() if self.has_dora else "networks.lora"

    def network_args(self) -> dict[str, str]:
        return super().network_args() if self.has_dora else {}

    @classmethod
    def spec_from_file(cls, base, tensors) -> AdapterSpec:
        rank = tensors["lora_down.weight"].shape[0]
        return AdapterSpec("lora", rank, file_alpha(tensors, rank), "dora_scale" in tensors)

    @staticmethod
    def cut_to_rank(tensors, dyn: int):
        """The WebUI's `dyn`: keep the first `dyn` ranks but the scale alpha / FULL rank (it slices
        up/down and leaves `dim` alone). Our scale is alpha / own rank, so alpha is rescaled."""
        rank = tensors["lora_down.weight"].shape[0]
        kept = min(dyn, rank)
        out = dict(tensors)
        out["lora_down.weight"] = tensors["lora_down.weight"][:kept]
        out["lora_up.weight"] = tensors["lora_up.weight"][:, :kept]
        out["alpha"] = torch.tensor(file_alpha(tensors, rank) * kept / rank)
        return out
