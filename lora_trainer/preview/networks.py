"""LoRA networks a preview stacks: files from the LoRA folder (cached) and `dyn=` rank cuts."""
from __future__ import annotations

import torch

from ..lora.adapters import adapter_class_for
from ..lora.kohya_file import file_layers, network_from_tensors, read_lora_file
from ..lora.network import LoRANetwork


def truncate_rank(tensors: dict[str, torch.Tensor], dyn: int) -> dict[str, torch.Tensor]:
    """The WebUI's `dyn=`: each layer's variant cuts its own tensors (only LoRA has a rank to cut;
    the WebUI ignores `dyn` for the others)."""
    out = {}
    for layer, keys in file_layers(tensors).items():
        cls = adapter_class_for(keys)
        cut = cls.cut_to_rank(keys, dyn) if cls is not None else keys
        out.update({f"{layer}.{k}": v for k, v in cut.items()})
    return out


def build_network(targets, tensors, device, dyn: int | None = None) -> tuple[LoRANetwork, list[str]]:
    """A detached network over the live model's layers; also the file's layers the model lacks."""
    network, unmatched = network_from_tensors(targets, tensors, dyn)
    network.to(device, torch.float32)
    return network, unmatched


class NetworkCache:
    """Networks built from files, by (path, mtime, size, dyn): a LoRA rewritten on disk (e.g. by
    another training run) is reloaded, an unchanged one is built once."""

    def __init__(self):
        self._networks: dict[tuple, LoRANetwork] = {}

    def get(self, path, targets, device, dyn: int | None = None, warn=None) -> LoRANetwork:
        """`warn(text)` hears, once per loaded file, about layers this model does not have."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, dyn)
        if key not in self._networks:
            self._forget_other_versions(key)
            tensors, _ = read_lora_file(path)
            self._networks[key], unmatched = build_network(targets, tensors, device, dyn)
            if unmatched and warn:
                warn(f"{path.name}: {len(unmatched)} of its layers do not exist in this model (e.g. "
                     f"{unmatched[0]}); it was probably trained for another model family")
        return self._networks[key]

    def _forget_other_versions(self, key: tuple) -> None:
        for old in [k for k in self._networks if k[0] == key[0] and k[1:3] != key[1:3]]:
            del self._networks[old]
