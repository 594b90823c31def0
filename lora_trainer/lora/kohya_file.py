"""Reading and writing LoRA files in kohya's format (what the WebUI, Forge, ComfyUI and diffusers load).

Keys: `<layer>.lora_down.weight`, `<layer>.lora_up.weight`, `<layer>.alpha` (0-dim). Metadata values
are strings (safetensors requires it; the WebUI json-decodes the ones that start with '{').
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..storage.atomic import atomic_write_bytes
from .network import LoRANetwork

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoraFileError(ValueError):
    pass


def network_tensors(network: LoRANetwork, precision: str = "fp32") -> dict[str, torch.Tensor]:
    dtype = DTYPES[precision]
    tensors = {}
    for name, adapter in network.adapters.items():
        tensors[f"{name}.lora_down.weight"] = adapter.down.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = adapter.up.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = adapter.alpha.detach().to("cpu", dtype)
    return tensors


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise LoraFileError(f"{path}: not a readable .safetensors LoRA file ({e})") from e
    return tensors, metadata


def layer_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """layer name -> (rank, alpha) of a kohya LoRA state dict (alpha defaults to rank, as kohya does)."""
    ranks = {}
    for key, value in tensors.items():
        if key.endswith(".lora_down.weight"):
            layer = key[: -len(".lora_down.weight")]
            rank = value.shape[0]
            alpha = tensors.get(f"{layer}.alpha")
            ranks[layer] = (rank, float(alpha) if alpha is not None else float(rank))
    return ranks


@torch.no_grad()
def load_into_network(network: LoRANetwork, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a kohya state dict into a network with the same layers and ranks (incremental training)."""
    ranks = layer_ranks(tensors)
    missing = sorted(set(network.adapters) - set(ranks))
    extra = sorted(set(ranks) - set(network.adapters))
    problems = []
    if missing:
        problems.append(f"{len(missing)} trained layers are not in the file (e.g. {missing[0]}); "
                        "target_modules / train_text_encoder probably differ from the run that wrote it")
    if extra:
        problems.append(f"{len(extra)} layers of the file do not exist in this model (e.g. {extra[0]}); "
                        "it was probably trained for another model family")
    for name in sorted(set(ranks) & set(network.adapters)):
        adapter = network.adapters[name]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        if down.shape != adapter.down.weight.shape or up.shape != adapter.up.weight.shape:
            problems.append(f"layer {name}: file has rank {ranks[name][0]} / shapes {tuple(down.shape)}, "
                            f"{tuple(up.shape)}; this run expects rank {adapter.rank} / shapes "
                            f"{tuple(adapter.down.weight.shape)}, {tuple(adapter.up.weight.shape)} "
                            "(set lora_rank to the file's rank)")
            break
    if problems:
        raise LoraFileError(f"init_lora_from {source} does not fit: " + "; ".join(problems))
    for name, adapter in network.adapters.items():
        adapter.down.weight.copy_(tensors[f"{name}.lora_down.weight"])
        adapter.up.weight.copy_(tensors[f"{name}.lora_up.weight"])
        adapter.alpha.copy_(torch.tensor(ranks[name][1]))


def addnet_hashes(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` / `sshs_legacy_hash`: hashes of the tensor bytes only, so editing the
    metadata does not change them."""
    blob = safetensors_bytes(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    data = blob[8 + header_len:]
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data).hexdigest(), legacy


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write atomically: the WebUI may scan the folder at any moment and must never see half a file."""
    path = Path(path)
    model_hash, legacy_hash = addnet_hashes(tensors)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items() if v is not None}
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
    return path


def network_from_tensors(all_targets, tensors: dict[str, torch.Tensor]) -> tuple[LoRANetwork, list[str]]:
    """A network over the layers a kohya file names (any rank per layer), e.g. another user's LoRA
    stacked in a preview. Returns the network and the file's layer names this model does not have."""
    ranks = layer_ranks(tensors)
    targets = [t for t in all_targets if t.name in ranks]
    unmatched = sorted(set(ranks) - {t.name for t in targets})
    network = LoRANetwork(targets, rank=1, ranks={t.name: ranks[t.name] for t in targets})
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            adapter.down.weight.copy_(tensors[f"{name}.lora_down.weight"])
            adapter.up.weight.copy_(tensors[f"{name}.lora_up.weight"])
    return network, unmatched
