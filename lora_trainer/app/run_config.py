"""A run's config: config/'s loading plus what only the model file can say.

An SD config that does not name `resolution` trains at its model family's native size (SDXL 1024,
SD2-768-v 768, SD1/SD2-base 512), so an SDXL model never trains at 512 by accident. The size is
read from the base model's header (no weights, no torch) by backbones/, which config/ may not
import; so every host loads a config for a run through here: the CLI (train, demo, doctor,
check-data), the standalone tab (form, presets, runs) and the WebUI tab.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from ..config import REQUIRED_KEYS, TrainConfig, config_from_dict, load_config


def native_resolution(base_model: str, base_model_config: Optional[str]) -> Optional[int]:
    """The default resolution of the model's family row, or None when the model cannot be
    described (the model load then names the problem with its field)."""
    from ..backbones.loading import describe_model, family_for

    try:
        info = describe_model(base_model, base_model_config)
    except Exception:   # noqa: BLE001 - reported by the load, which names base_model
        return None
    return family_for(info).default_resolution


def load_run_config(path, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """config.load_config with the model's native resolution as the default."""
    return load_config(path, overrides, native_resolution=native_resolution)


def run_config_from_dict(d: Mapping[str, Any], base_dir, source: str = "<ui>", *,
                         required: Iterable[str] = tuple(REQUIRED_KEYS)) -> TrainConfig:
    """config.config_from_dict with the model's native resolution as the default."""
    return config_from_dict(d, base_dir, source, required=required, native_resolution=native_resolution)
