"""Attaching adapters to a base layer without changing the model's module tree.

The base layer's `forward` is replaced on the *instance* while adapters are attached (kohya's trick):
module names, `state_dict()` keys and the WebUI's per-layer bookkeeping stay exactly as they were, so
the live WebUI model can be trained in place and handed back untouched. Several adapters (from several
networks) can sit on one layer; that is how previews stack `<lora:a:0.7> <lora:b:0.5>`.

A target is normally the Linear / Conv2d itself (`AdapterHost` adds each adapter's output). A
`LinearSlot` is a Linear-shaped part of a fused layer instead (the q, k, v or out projection of an
`nn.MultiheadAttention`, lora.mha): its adapters go to one host per fused layer, of the slot's
`host_class`, keyed by (network, slot).
"""
from __future__ import annotations

import torch
from torch import nn

_HOST_ATTR = "_lora_trainer_host"


class LinearSlot:
    """One Linear-shaped projection inside a fused layer: a LoRA target that is not a module of its
    own. `module` is the layer whose forward `host_class` replaces, `slot` names the part; `weight`
    is the live (out_features, in_features) weight of that part (a view into the fused weight)."""

    host_class: type   # set by the subclass

    def __init__(self, module: nn.Module, slot: str, in_features: int, out_features: int):
        self.module, self.slot = module, slot
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__}, {self.slot!r})"


class AdapterHost:
    def __init__(self, module: nn.Module):
        self.module = module
        # An instance-level forward (someone else's patch) must come back exactly as it was.
        self.previous_instance_forward = module.__dict__.get("forward")
        self.base_forward = module.forward
        self.adapters: dict = {}  # id(network) (or (id(network), slot)) -> adapter, in attach order

    def __call__(self, x, *args, **kwargs):
        y = self.base_forward(x, *args, **kwargs)
        for adapter in self.adapters.values():
            # A multiplier of 0 skips the adapter so the output is bitwise the base output.
            if adapter.multiplier != 0:
                y = y + adapter(x).to(y.dtype)
        return y

    def install(self):
        self.module.forward = self
        self.module.__dict__[_HOST_ATTR] = self

    def uninstall(self):
        if self.previous_instance_forward is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous_instance_forward
        self.module.__dict__.pop(_HOST_ATTR, None)


def _site(target) -> tuple[nn.Module, type, str | None]:
    """(the module whose forward is replaced, its host class, the slot or None) of a target."""
    if isinstance(target, LinearSlot):
        return target.module, target.host_class, target.slot
    return target, AdapterHost, None


def add_adapter(module, owner: object, adapter: nn.Module) -> None:
    base, host_class, slot = _site(module)
    host = base.__dict__.get(_HOST_ATTR)
    if host is None:
        host = host_class(base)
        host.install()
    host.adapters[id(owner) if slot is None else (id(owner), slot)] = adapter


def remove_adapter(module, owner: object) -> None:
    base, _, slot = _site(module)
    host = base.__dict__.get(_HOST_ATTR)
    if host is None:
        return
    host.adapters.pop(id(owner) if slot is None else (id(owner), slot), None)
    if not host.adapters:
        host.uninstall()


def has_adapters(module) -> bool:
    return _HOST_ATTR in _site(module)[0].__dict__
