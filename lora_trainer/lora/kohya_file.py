"""Reading and writing LoRA files in kohya's format (what the WebUI, Forge, ComfyUI and diffusers load).

Keys: `<layer>.<key>` with the keys of the layer's adapter variant (lora.adapters: `lora_down.weight`,
`lora_up.weight`, `hada_w1_a`, `lokr_w1`, …, `alpha` 0-dim, `dora_scale`). Metadata values
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
from .adapters import Adapter, AdapterError, adapter_class_for, type_name
from .network import LoRANetwork

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoraFileError(ValueError):
    pass


def network_tensors(network: LoRANetwork, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """`<layer>.<key>` for every adapter's file keys (its variant decides them)."""
    dtype = DTYPES[precision]
    return {f"{name}.{key}": tensor.detach().to("cpu", dtype).contiguous()
            for name, adapter in network.adapters.items()
            for key, tensor in adapter.file_tensors().items()}


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise LoraFileError(f"{path}: not a readable .safetensors LoRA file ({e})") from e
    return tensors, metadata


def file_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """layer name -> {key suffix: tensor}. kohya layer names have no dots, so the first dot ends
    the name (`lora_unet_…_to_q.lora_down.weight`)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, suffix = key.partition(".")
        layers.setdefault(layer, {})[suffix] = value
    return layers


def layer_types(tensors: dict[str, torch.Tensor]) -> dict[str, type[Adapter] | None]:
    """layer name -> the adapter variant its keys are (None: not one we know, e.g. OFT or Tucker
    LoCon's `lora_mid`)."""
    return {layer: adapter_class_for(keys) for layer, keys in file_layers(tensors).items()}


def _type_of(kinds: set[tuple[str, bool]]) -> str:
    return " and ".join(sorted(type_name(kind, dora) for kind, dora in kinds)) or "nothing"


@torch.no_grad()
def load_into_network(network: LoRANetwork, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a file into a network with the same layers, type and shapes (incremental training);
    alphas come from the file."""
    layers = file_layers(tensors)
    found = {name: cls for name, cls in layer_types(tensors).items() if name in network.adapters}
    unknown = next((name for name, cls in found.items() if cls is None), None)
    if unknown is not None:
        raise LoraFileError(f"init_lora_from {source}: layer {unknown} has keys {sorted(layers[unknown])}, not a "
                            "LoRA, LoHa or LoKr layout this trainer supports")
    classes = {name: cls for name, cls in found.items() if cls is not None}   # all of them, by now
    file_type = _type_of({(cls.kind, "dora_scale" in layers[n]) for n, cls in classes.items()})
    run_type = _type_of({(network.adapters[n].kind, network.adapters[n].has_dora) for n in classes})
    if classes and file_type != run_type:
        raise LoraFileError(f"init_lora_from {source} is a {file_type} file, but this run trains {run_type}: "
                            f"set adapter_type (and dora) to the file's type, or start without init_lora_from")
    missing = sorted(set(network.adapters) - set(layers))
    extra = sorted(set(layers) - set(network.adapters))
    problems = []
    if missing:
        problems.append(f"{len(missing)} trained layers are not in the file (e.g. {missing[0]}); "
                        "target_modules / train_text_encoder probably differ from the run that wrote it")
    if extra:
        problems.append(f"{len(extra)} layers of the file do not exist in this model (e.g. {extra[0]}); "
                        "it was probably trained for another model family")
    for name in sorted(set(layers) & set(network.adapters)):
        adapter = network.adapters[name]
        try:
            adapter.load_file_tensors(layers[name])
        except AdapterError as e:
            file_rank = classes[name].spec_from_file(network.targets[name].module, layers[name]).rank
            problems.append(f"layer {name}: the file has rank {file_rank}, this run rank {adapter.rank} ({e}); "
                            "set lora_rank (conv_rank for 3x3 convolutions, lokr_factor for LoKr) to the "
                            "file's values")
            break
    if problems:
        raise LoraFileError(f"init_lora_from {source} does not fit: " + "; ".join(problems))


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


def network_from_tensors(all_targets, tensors: dict[str, torch.Tensor],
                        dyn: int | None = None) -> tuple[LoRANetwork, list[str]]:
    """A network over the layers a file names, of whatever variant and rank each layer is (e.g.
    another user's LoRA stacked in a preview); `dyn` cuts ranks as the WebUI's `dyn=` does.
    Returns the network and the file's layers this model does not have. A layer of a variant or
    option we do not support raises LoraFileError naming it."""
    by_name = {t.name: t for t in all_targets}
    layers = file_layers(tensors)
    adapters, unmatched = {}, []
    for name, cls in sorted(layer_types(tensors).items()):
        if name not in by_name:
            unmatched.append(name)
            continue
        if cls is None:
            raise LoraFileError(f"layer {name}: keys {sorted(layers[name])} are not a LoRA, LoHa or LoKr "
                                "layout this trainer supports")
        own = layers[name] if dyn is None else cls.cut_to_rank(layers[name], dyn)
        try:
            adapters[name] = cls.from_file(by_name[name].module, own)
        except AdapterError as e:
            raise LoraFileError(f"layer {name}: {e}") from e
    targets = [by_name[name] for name in adapters]
    return LoRANetwork(targets, adapters=adapters), unmatched
