"""Adapter variants, chosen by `adapter_type` through one registry.

To add a variant: a file with an `Adapter` subclass (its `kind`, `signature` file keys, `updown`,
`zero_factor`, `spec_from_file`) and a row in ADAPTERS. Nothing outside this package branches on
the type: the network, the file I/O, checkpoints, previews and the WebUI code use the base class.
"""
from __future__ import annotations

from .base import Adapter, AdapterError, AdapterSpec
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter

ADAPTERS: dict[str, type[Adapter]] = {cls.kind: cls for cls in (LoRAAdapter, LoHaAdapter, LoKrAdapter)}

# adapter_type (the config's word) -> (registry kind, whether convolutions are trained too).
# "locon" is LoRA math on the convolutions as well: target_modules 'locon' with adapter_type 'lora'
# (older configs) means the same thing.
ADAPTER_TYPES = {"lora": ("lora", False), "locon": ("lora", True), "loha": ("loha", False),
                 "lokr": ("lokr", False)}


def adapter_setup(cfg) -> tuple[AdapterSpec, str]:
    """(the spec of every adapter, the target_modules preset) a config asks for."""
    kind, with_convs = ADAPTER_TYPES[cfg.adapter_type]
    spec = AdapterSpec(kind, cfg.lora_rank, cfg.lora_alpha, cfg.dora, cfg.lokr_factor)
    return spec, ("locon" if with_convs else cfg.target_modules)


def build_adapter(base, spec: AdapterSpec) -> Adapter:
    try:
        cls = ADAPTERS[spec.kind]
    except KeyError:
        raise AdapterError(f"unknown adapter type {spec.kind!r} (one of {', '.join(ADAPTERS)})") from None
    return cls(base, spec)


def adapter_class_for(file_keys) -> type[Adapter] | None:
    """The variant whose keys a file's layer has (None: no variant we know)."""
    return next((cls for cls in ADAPTERS.values() if cls.recognises(file_keys)), None)


def type_name(kind: str, dora: bool) -> str:
    """How a message names a type: 'lora', 'loha + DoRA', …"""
    return f"{kind}{' + DoRA' if dora else ''}"


__all__ = ["ADAPTERS", "ADAPTER_TYPES", "Adapter", "AdapterError", "AdapterSpec", "LoHaAdapter",
           "LoKrAdapter", "LoRAAdapter", "adapter_class_for", "adapter_setup", "build_adapter", "type_name"]
