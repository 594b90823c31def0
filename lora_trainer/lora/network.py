"""A LoRA network: one adapter per target layer, attached to / detached from a live model.

The adapters may be any variant (lora.adapters): the network only uses the base class.

Explicit lifecycle (peft-style): attach() / detach() for the forward-time path used in training and
previews; merge() / unmerge() to bake the update into the base weights (unmerge restores the exact
original bytes from a backup, not W - dW, so a round trip never drifts).
"""
from __future__ import annotations

from collections.abc import ItemsView, Mapping, ValuesView
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from . import host
from .adapters import Adapter, AdapterSpec, build_adapter
from .targets import LoraTarget


def conv_spec(spec: AdapterSpec, conv_rank: int | None, conv_alpha: float | None) -> AdapterSpec:
    """The spec of a 3x3 convolution: conv_rank / conv_alpha when set. With conv_rank set and
    conv_alpha empty, alpha = conv_rank (kohya's rule); with neither, the layer is like the others."""
    if conv_rank is None and conv_alpha is None:
        return spec
    rank = conv_rank or spec.rank
    return replace(spec, rank=rank, alpha=conv_alpha if conv_alpha is not None else
                   (spec.alpha if conv_rank is None else None))


class AdapterDict(nn.ModuleDict):
    """Layer name -> Adapter. A ModuleDict, so the network's parameter names stay
    `adapters.<layer>.<parameter>` (checkpoints store them by name); typed, because nn.ModuleDict
    hands out plain Modules and the callers need the Adapter base class. The casts hold because
    the constructor is the only writer and takes Adapters only."""

    def __init__(self, adapters: Mapping[str, Adapter]):
        super().__init__(adapters)

    def __getitem__(self, key: str) -> Adapter:
        return cast(Adapter, super().__getitem__(key))

    def items(self) -> ItemsView[str, Adapter]:
        return cast("ItemsView[str, Adapter]", super().items())

    def values(self) -> ValuesView[Adapter]:
        return cast("ValuesView[Adapter]", super().values())


class LoRANetwork(nn.Module):
    def __init__(self, targets: list[LoraTarget], rank: int = 8, alpha: float | None = None,
                 conv_rank: int | None = None, conv_alpha: float | None = None, *,
                 spec: AdapterSpec | None = None, adapters: dict[str, Adapter] | None = None):
        """One adapter per target from `spec` (default: LoRA of `rank`/`alpha`), 3x3 convolutions
        with conv_rank/conv_alpha; or the given `adapters` (name -> adapter, e.g. from a file)."""
        super().__init__()
        self.targets = {t.name: t for t in targets}
        if adapters is None:
            spec = spec or AdapterSpec("lora", rank, alpha)
            convs = conv_spec(spec, conv_rank, conv_alpha)
            adapters = {t.name: build_adapter(t.module, convs if t.is_conv3x3 else spec) for t in targets}
        self.adapters = AdapterDict(adapters)
        self._attached = False
        self._merged_backup: dict[str, torch.Tensor] = {}

    def is_untrained(self) -> bool:
        """True while the network adds exactly nothing (every adapter's zero-initialised factor)."""
        return all(adapter.is_untrained() for adapter in self.adapters.values())

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
            weight = self.targets[name].weight
            self._merged_backup[name] = weight.detach().clone()
            weight.add_(adapter.delta_weight().to(weight.device, weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, original in self._merged_backup.items():
            self.targets[name].weight.copy_(original)
        self._merged_backup.clear()

    # ---- parameters -----------------------------------------------------------------------------------
    def trainable_parameters(self, text_encoder: bool) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the UNet or the text-encoder adapters, in a fixed (name-sorted) order:
        the optimizer state and gradient-clipping sums depend on the order, so it must never vary."""
        return sorted(((f"{name}.{pname}", p)
                       for name, adapter in self.adapters.items()
                       if self.targets[name].is_text_encoder == text_encoder
                       for pname, p in adapter.named_parameters()), key=lambda kv: kv[0])
