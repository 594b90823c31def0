"""The adapter as a PEFT folder: `adapter_model.safetensors` + `adapter_config.json`, which
`peft.PeftModel.from_pretrained(base, folder)` loads, written atomically (see write_peft_folder).

PEFT's LoRA is the same math as ours: lora_A is our `down`, lora_B our `up`, and the update is
scaled by lora_alpha / r. Only plain LoRA exports to PEFT (one rank and alpha for every layer).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...storage.atomic import atomic_write_bytes, json_bytes, safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def peft_tensors(network, module_paths: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, adapter in network.adapters.items():
        prefix = f"base_model.model.{module_paths[name]}"
        tensors[f"{prefix}.lora_A.weight"] = adapter.down.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = adapter.up.weight.detach().to("cpu", dtype).contiguous()
    return tensors


def peft_config(network, module_paths: dict[str, str], base_model: str, rank: int, alpha: float) -> dict:
    leaves = sorted({module_paths[name].rsplit(".", 1)[-1] for name in network.adapters})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "target_modules": leaves, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_folder(folder: Path, tensors: dict, config: dict) -> Path:
    """Each file is written atomically (temp file, fsync, rename). The config first: within a run it
    never changes (rank, alpha and targets cannot change on resume), so replacing the weights file
    is the one switch from the old adapter to the new and a reader never sees a mix."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / CONFIG_NAME, json_bytes(config))
    # one metadata key only: safetensors writes metadata in hash-map order, which varies between
    # processes, and a resumed run must write the same bytes as an uninterrupted one
    atomic_write_bytes(folder / WEIGHTS_NAME, safetensors_bytes(tensors, {"format": "pt"}))
    return folder
