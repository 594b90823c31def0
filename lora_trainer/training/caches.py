"""Persistent caches of VAE latents and caption embeddings (safetensors, one file per entry).

An entry's key hashes everything its value depends on (image bytes, bucket, crop, model identity,
the encoding seed), so a changed image, crop or model simply misses; nothing needs invalidating.
Each file stores a checksum of its tensor bytes: a corrupt entry is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes

from ..storage.atomic import atomic_write_bytes

log = logging.getLogger("lora_trainer")
FORMAT = "1"


def default_cache_dir() -> Path:
    env = os.environ.get("LORA_TRAINER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_trainer"


def cache_key(**parts) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DiskCache:
    def __init__(self, folder: Path, kind: str):
        self.folder = Path(folder) / kind
        self.hits = self.misses = self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            data = path.read_bytes()
            tensors = load_safetensors(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            if meta.get("key") != key or meta.get("checksum") != _tensor_checksum(tensors):
                raise ValueError("checksum mismatch")
        except Exception as e:  # any damage at all means: recompute
            self.corrupt += 1
            log.warning("cache entry %s is corrupt (%s); recomputing it", path, e)
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"key": key, "checksum": _tensor_checksum(tensors)}
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
        except OSError as e:  # a cache that cannot be written only costs speed
            log.warning("could not write cache entry %s: %s", path, e)
