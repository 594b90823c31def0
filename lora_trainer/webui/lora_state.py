"""The loaded model's weights before, during and after training inside the WebUI.

1. Before: the built-in Lora extension merges a generation's `<lora:…>` *into the weights in place*
   (keeping a CPU backup per layer) and only restores them lazily, on a later forward. Training
   right after such a generation would train on top of someone else's LoRA. `clean_base_weights`
   empties `networks.loaded_networks`, copies every backup back (inside `no_grad`: the WebUI's
   restore writes into leaf parameters that require grad) and resets each layer's
   `network_current_names` cache, then proves every restored layer equals its backup exactly.
2. During: `ModelGuard` records a digest of every weight, which modules have an instance-level
   `forward`, and each parameter's `requires_grad`; on exit it removes every adapter host this
   package installed (also after an exception), gives back the flags, and checks the digest: the
   WebUI gets its model back bit for bit.
3. After a LoRA file is written: `invalidate_webui_lora_caches` makes the WebUI see the new file
   (card list rescan) and forget what it cached about the old one (per-layer merge cache, the
   class-level prompt-conditioning cache).

A1111 v1.10's Lora extension; Forge's patchers are handled in `forge.py` (`invalidate_webui_lora_caches`
hands Forge over to it).
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..lora import host
from .env import WebuiEnv, is_a1111_networks, refresh_lora_cards

log = logging.getLogger("lora_trainer")


class BaseWeightsError(RuntimeError):
    """The loaded model's weights are not (or no longer) the checkpoint's."""


# ---- digests ----------------------------------------------------------------------------------------

def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    raw = data.view(torch.uint8) if data.dim() > 0 else data.reshape(1).view(torch.uint8)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(tensor.shape)}".encode())
    h.update(raw.numpy().data)
    return h.hexdigest()


def weight_digests(module: nn.Module) -> dict[str, str]:
    """name -> digest of every parameter and buffer (each tensor once, under its first name).
    Hashed on all cores: hashlib drops the GIL on big buffers, and an SDXL model is ~7 GB that a
    job hashes twice (before and after)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(tensors, pool.map(_tensor_digest, tensors.values())))


def combined_digest(digests: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name].encode())
    return h.hexdigest()


# ---- 1. undo the Lora extension's merges ---------------------------------------------------------------

@dataclass
class CleanReport:
    unloaded: list[str] = field(default_factory=list)   # names that were in loaded_networks
    restored_layers: int = 0                             # layers whose weights held a merged LoRA
    verified_layers: int = 0                             # layers whose weights were compared to a backup
    digest: str = ""                                     # of the backups the weights were checked against

    def summary(self) -> str:
        if not self.unloaded and not self.restored_layers:
            return f"base weights clean ({self.verified_layers} layers checked against their backups)"
        return (f"unloaded {', '.join(self.unloaded) or 'no'} LoRA(s) from the WebUI and restored "
                f"{self.restored_layers} merged layers; {self.verified_layers} layers verified equal "
                "to their backups")


def _layers(sd_model) -> list[Any]:
    """The layers the Lora extension names (Any: they carry its `network_*` attributes)."""
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if mapping:
        return list(dict.fromkeys(mapping.values()))  # unique, in order
    return [m for m in sd_model.modules() if hasattr(m, "network_layer_name")]


def _backup_pairs(module: nn.Module):
    """(live tensor, backup tensor, label) for every weight/bias the Lora extension backed up."""
    weights = getattr(module, "network_weights_backup", None)
    biases = getattr(module, "network_bias_backup", None)
    if isinstance(module, nn.MultiheadAttention):
        if weights is not None:
            yield module.in_proj_weight, weights[0], "in_proj_weight"
            yield module.out_proj.weight, weights[1], "out_proj.weight"
        if biases is not None:
            yield module.out_proj.bias, biases, "out_proj.bias"
        return
    if weights is not None:
        yield module.weight, weights, "weight"
    if biases is not None:
        yield module.bias, biases, "bias"


def clean_base_weights(sd_model, networks) -> CleanReport:
    """Undo every LoRA the WebUI merged into `sd_model` and prove the weights are the backups."""
    report = CleanReport()
    if networks is None:   # the Lora extension is disabled: nothing can have been merged
        return report
    if not is_a1111_networks(networks):
        raise BaseWeightsError("this WebUI's Lora extension keeps no weight backups (Forge?): training "
                               "on the loaded model is only supported on AUTOMATIC1111 v1.10")
    report.unloaded = [getattr(n, "name", str(n)) for n in networks.loaded_networks]
    networks.loaded_networks.clear()
    problems = []
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for module in _layers(sd_model):
            current = getattr(module, "network_current_names", ())
            has_backup = (getattr(module, "network_weights_backup", None) is not None
                          or getattr(module, "network_bias_backup", None) is not None)
            if current and not has_backup:
                problems.append(f"{getattr(module, 'network_layer_name', module)}: a LoRA is merged but "
                                "there is no backup to restore")
                continue
            if has_backup:
                networks.network_restore_weights_from_backup(module)
                report.restored_layers += bool(current)
            module.network_current_names = ()
            for live, backup, label in _backup_pairs(module):
                report.verified_layers += 1
                if live is None or backup is None:
                    if live is not backup:
                        problems.append(f"{module.network_layer_name}.{label}: present on one side only")
                    continue
                if not torch.equal(live.detach().cpu(), backup.cpu()):
                    problems.append(f"{module.network_layer_name}.{label} differs from its backup")
                h.update(_tensor_digest(backup).encode())
    if problems:
        raise BaseWeightsError("could not restore the model's own weights after a LoRA generation "
                               f"({len(problems)} problems): " + "; ".join(problems[:5])
                               + ". Reload the checkpoint (Settings > Actions or switch models) "
                                 "and try again.")
    report.digest = h.hexdigest()
    return report


# ---- 2. the model comes back exactly as it was ----------------------------------------------------------

class ModelGuard:
    """`with ModelGuard(sd_model) as guard:` — whatever happens inside, on exit no adapter host is
    left, instance `forward`s are as they were, `requires_grad` flags are restored, and the weights
    are checked bit for bit against their digest from the start."""

    def __init__(self, sd_model: nn.Module, check_weights: bool = True):
        self.model = sd_model
        self.check_weights = check_weights
        self.digests: dict[str, str] = {}
        self.after: dict[str, str] = {}

    def __enter__(self) -> "ModelGuard":
        self.requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.instance_forwards = {id(m): m.__dict__.get("forward") for m in self.model.modules()
                                  if "forward" in m.__dict__}
        self.training = [(m, m.training) for m in self.model.modules()]
        if self.check_weights:
            self.digests = weight_digests(self.model)
        return self

    @property
    def digest(self) -> str:
        return combined_digest(self.digests)

    def freeze(self) -> None:
        for p, _ in self.requires_grad:
            p.requires_grad_(False)

    def remove_adapters(self) -> int:
        removed = 0
        for module in self.model.modules():
            if host.has_adapters(module):
                module.__dict__[host._HOST_ATTR].uninstall()
                removed += 1
        return removed

    def __exit__(self, exc_type, exc, tb) -> None:
        problems = []
        removed = self.remove_adapters()
        if removed and exc_type is None:
            log.info("removed LoRA adapters from %d layers of the WebUI model", removed)
        for module in self.model.modules():
            before = self.instance_forwards.get(id(module))
            now = module.__dict__.get("forward")
            if now is not before:
                if before is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = before
                problems.append(f"instance forward of {type(module).__name__} was changed (put back)")
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag
        if self.check_weights:
            self.after = weight_digests(self.model)
            changed = sorted(k for k in set(self.digests) | set(self.after)
                             if self.digests.get(k) != self.after.get(k))
            if changed:
                problems.append(f"{len(changed)} weights changed during training (e.g. {changed[:3]})")
        if problems:
            message = "the WebUI model is not as it was before training: " + "; ".join(problems)
            if exc_type is None and any("weights changed" in p for p in problems):
                raise BaseWeightsError(message + ". Reload the checkpoint before generating.")
            log.error(message)


# ---- 3. make the WebUI see a new or overwritten LoRA file ------------------------------------------------

def invalidate_webui_lora_caches(env: WebuiEnv | None = None, names=()) -> list[str]:
    """After writing LoRA files: rescan the Lora card list, drop the per-layer merge cache and the
    prompt-conditioning cache so the next `<lora:name:w>` uses the file as it is now. Returns what
    was done (for the log)."""
    env = env or WebuiEnv.current()
    if env.is_forge:
        from .forge import invalidate_forge_lora_caches
        return invalidate_forge_lora_caches(env, names)
    done = []
    networks = env.networks
    if networks is not None:
        for name in names:
            getattr(networks, "networks_in_memory", {}).pop(name, None)
        refreshed = refresh_lora_cards(env, networks)
        if refreshed:
            done.append(refreshed)
        if env.sd_model is not None and is_a1111_networks(networks):
            with torch.no_grad():
                for module in _layers(env.sd_model):
                    if getattr(module, "network_current_names", ()):
                        networks.network_restore_weights_from_backup(module)
                    module.network_current_names = ()
            done.append("reset the per-layer LoRA cache")
    processing = env.processing
    cls = getattr(processing, "StableDiffusionProcessing", None) if processing is not None else None
    if cls is not None:
        cls.cached_c = [None, None]
        cls.cached_uc = [None, None]
        done.append("cleared the conditioning cache")
    return done
