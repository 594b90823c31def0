"""The base model of a causal-LM run: a local Hugging Face folder loaded offline, safetensors only.

`CausalLMBackbone` gives the loop what it needs from any base model (device, identity, the
LoRA-able layers, freeze, gradient checkpointing, runtime settings) plus what this task needs
(the transformers model and its tokenizer). The LoRA layers are listed by their module path; the
adapter names the network uses are that path with '.' -> '_' (a ModuleDict key cannot hold dots).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...lora.targets import ATTENTION, FEED_FORWARD, LoraTarget

if TYPE_CHECKING:   # imported on use at run time (transformers is heavy)
    from transformers import PreTrainedModel

# projection names of LLaMA-style decoders (and most AutoModelForCausalLM since: Mistral, Qwen2,
# Gemma, Phi-3 fuse some of them, GPT-2 uses Conv1D and is not covered)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
COMPONENT = "lm"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


class ModelFolderError(ValueError):
    """The base_model folder cannot be used (missing, pickle-only weights, not a causal LM)."""


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files; refuses a folder with pickle weights only, naming it."""
    if not folder.is_dir():
        raise ModelFolderError(f"base_model '{folder}' must be a Hugging Face model folder "
                               "(config.json, tokenizer.json, *.safetensors) for task_type: causal_lm")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"base_model '{folder}' has no config.json: not a Hugging Face model folder")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = [p.name for p in folder.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix == ".bin"]
    if pickled:
        raise ModelFolderError(
            f"base_model '{folder}' has only pickle weights ({', '.join(sorted(pickled))}); they can run "
            "code when loaded, so they are refused. Convert the folder to safetensors (e.g. "
            "model.save_pretrained(folder, safe_serialization=True) in a trusted environment).")
    raise ModelFolderError(f"base_model '{folder}' has no *.safetensors weights")


def folder_fingerprint(folder: Path, weights: list[Path]) -> str:
    """config.json and the weight files' sizes and first/last MiB: cheap, and changes with the model."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weights:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _quiet_transformers() -> None:
    """No download/loading progress bars on the console: the trainer reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:   # noqa: BLE001 - transformers raises many kinds; name the folder
        raise ModelFolderError(f"base_model '{folder}': cannot load its tokenizer offline "
                               f"({type(error).__name__}: {error})") from error
    if not getattr(tokenizer, "is_fast", False):
        raise ModelFolderError(f"base_model '{folder}': needs a fast tokenizer (tokenizer.json) for the "
                               "loss masks (character offsets)")
    return tokenizer


def load_causal_lm(base_model: str, device: torch.device, dtype: torch.dtype) -> "CausalLMBackbone":
    from transformers import AutoModelForCausalLM

    folder = Path(base_model)
    weights = safetensors_files(folder)
    tokenizer = load_tokenizer(folder)
    try:
        # Any: transformers wraps PreTrainedModel.to in a decorator whose type mypy misreads
        model: Any = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                     use_safetensors=True, dtype=dtype)
    except Exception as error:   # noqa: BLE001
        raise ModelFolderError(f"base_model '{folder}': cannot load it as an AutoModelForCausalLM "
                               f"offline ({type(error).__name__}: {error})") from error
    return CausalLMBackbone(model.to(device), tokenizer, str(folder), folder_fingerprint(folder, weights))


def role_of(path: str) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ATTENTION_PROJECTIONS:
        return ATTENTION
    if leaf in MLP_PROJECTIONS:
        return FEED_FORWARD
    return None


def adapter_name(path: str) -> str:
    return path.replace(".", "_")


class CausalLMBackbone:
    def __init__(self, model: PreTrainedModel, tokenizer, source: str, source_hash: str):
        self.model, self.tokenizer = model, tokenizer
        self.source, self.source_hash = source, source_hash
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.model.config.use_cache = False
        # adapter name -> module path (what PEFT names the layer)
        self.module_paths: dict[str, str] = {}
        self.detected = f"{type(model).__name__} ({source})"
        self.checkpointing = False

    def identity(self) -> dict[str, Any]:
        return {"family": "causal_lm", "architecture": type(self.model).__name__,
                "source": self.source, "hash": self.source_hash}

    def lora_targets(self) -> list[LoraTarget]:
        targets = []
        for path, module in self.model.named_modules():
            role = role_of(path)
            if role and isinstance(module, nn.Linear):
                self.module_paths[adapter_name(path)] = path
                targets.append(LoraTarget(adapter_name(path), module, COMPONENT, role))
        return targets

    def freeze(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()   # no dropout: the loss is a pure function of the weights and the batch

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
            # transformers recomputes activations only in training mode (a config's dropout then applies)
            self.model.train()
        elif self.checkpointing:
            self.model.gradient_checkpointing_disable()
            self.model.eval()
        self.checkpointing = enabled

    def runtime_settings(self) -> dict[str, Any]:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def config_dict(self) -> dict:
        return json.loads(self.model.config.to_json_string())
