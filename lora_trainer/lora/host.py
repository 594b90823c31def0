"""Attaching adapters to a base layer without changing the model's module tree.

The base layer's `forward` is replaced on the *instance* while adapters are attached (kohya's trick):
module names, `state_dict()` keys and the WebUI's per-layer bookkeeping stay exactly as they were, so
the live WebUI model can be trained in place and handed back untouched. Several adapters (from several
networks) can sit on one layer; that is how previews stack `<lora:a:0.7> <lora:b:0.5>`.
"""
from __future__ import annotations

from torch import nn

_HOST_ATTR = "_lora_trainer_host"


class AdapterHost:
    def __init__(self, module: nn.Module):
        self.module = module
        # An instance-level forward (someone else's patch) must come back exactly as it was.
        self.previous_instance_forward = module.__dict__.get("forward")
        self.base_forward = module.forward
        self.adapters: dict[int, nn.Module] = {}  # id(network) -> adapter, in attach order

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


def add_adapter(module: nn.Module, owner: object, adapter: nn.Module) -> None:
    host = module.__dict__.get(_HOST_ATTR)
    if host is None:
        host = AdapterHost(module)
        host.install()
    host.adapters[id(owner)] = adapter


def remove_adapter(module: nn.Module, owner: object) -> None:
    host = module.__dict__.get(_HOST_ATTR)
    if host is None:
        return
    host.adapters.pop(id(owner), None)
    if not host.adapters:
        host.uninstall()


def has_adapters(module: nn.Module) -> bool:
    return _HOST_ATTR in module.__dict__
