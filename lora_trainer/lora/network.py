"""A LoRA network: one adapter per target layer, attached to / detached from a live model.

Explicit lifecycle (peft-style): attach() / detach() for the forward-time path used in training and
previews; merge() / unmerge() to bake the update into the base weights (unmerge restores the exact
original bytes from a backup, not W - dW, so a round trip never drifts).
"""
from __future__ import annotations

import torch
from torch import nn

from . import host
from .adapter import LoRAAdapter
from .targets import LoraTarget


class LoRANetwork(nn.Module):
    def __init__(self, targets: list[LoraTarget], rank: int, alpha: float | None = None,
                 conv_rank: int | None = None, conv_alpha: float | None = None,
                 ranks: dict[str, tuple[int, float]] | None = None):
        """`ranks` (name -> (rank, alpha)) overrides the uniform rank, e.g. when loading a file."""
        super().__init__()
        self.targets = {t.name: t for t in targets}
        adapters = {}
        for t in targets:
            if ranks is not None:
                r, a = ranks[t.name]
            elif t.is_conv3x3:
                r = conv_rank or rank
                a = conv_alpha if conv_alpha is not None else (alpha if conv_rank is None else None)
            else:
                r, a = rank, alpha
            adapters[t.name] = LoRAAdapter(t.module, r, a)
        self.adapters = nn.ModuleDict(adapters)
        self._attached = False
        self._merged_backup: dict[str, torch.Tensor] = {}

    # ---- multipliers --------------------------------------------------------------------------------
    def set_multipliers(self, unet: float = 1.0, te: float = 1.0) -> None:
        for name, adapter in self.adapters.items():
            adapter.multiplier = te if self.targets[name].is_text_encoder else unet

    # ---- forward-time path --------------------------------------------------------------------------
    def attach(self) -> "LoRANetwork":
        if not self._attached:
            for name, adapter in self.adapters.items():
                host.add_adapter(self.targets[name].module, self, adapter)
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            for name in self.adapters:
                host.remove_adapter(self.targets[name].module, self)
            self._attached = False

    # ---- merged path --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self._merged_backup:
            raise RuntimeError("network is already merged")
        for name, adapter in self.adapters.items():
            weight = self.targets[name].module.weight
            self._merged_backup[name] = weight.detach().clone()
            weight.add_(adapter.delta_weight().to(weight.device, weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, original in self._merged_backup.items():
            self.targets[name].module.weight.copy_(original)
        self._merged_backup.clear()

    # ---- parameters -----------------------------------------------------------------------------------
    def trainable_parameters(self, text_encoder: bool) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the UNet or the text-encoder adapters, in a fixed (name-sorted) order:
        the optimizer state and gradient-clipping sums depend on the order, so it must never vary."""
        return sorted(((f"{name}.{pname}", p)
                       for name, adapter in self.adapters.items()
                       if self.targets[name].is_text_encoder == text_encoder
                       for pname, p in adapter.named_parameters()), key=lambda kv: kv[0])
