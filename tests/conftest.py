"""Shared fixtures: a tiny SD1 model (random weights, built from configs — no network) and small
datasets, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Latent/text caches go to a per-session folder, never to ~/.cache."""
    os.environ["LORA_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> dict:
    """A tiny SD1 model written both ways: a WebUI-style single file (with its `<stem>.config/`
    folder beside it) and a diffusers folder."""
    from lora_trainer.backbones import tiny

    root = tmp_path_factory.mktemp("tiny_sd1")
    components = tiny.build_tiny_sd1(seed=0)
    single = root / "tiny-sd1.safetensors"
    tiny.write_single_file(single, components)
    tiny.write_config_folder(root / "tiny-sd1.config", components["configs"])
    folder = tiny.write_diffusers_folder(root / "tiny-sd1-diffusers", components)
    return {"single_file": single, "config_folder": root / "tiny-sd1.config", "folder": folder,
            "components": components}


@pytest.fixture(scope="session")
def sdxl_file(tmp_path_factory) -> Path:
    """A tiny SDXL model as a WebUI-style single file (SGM layout), with its `<stem>.config/`."""
    from lora_trainer.backbones import tiny_files
    from lora_trainer.backbones.tiny import build_tiny

    folder = tmp_path_factory.mktemp("sdxl")
    components = build_tiny("sdxl", seed=3)
    path = tiny_files.write_single_file(folder / "xl.safetensors", components)
    tiny_files.write_config_folder(folder / "xl.config", components["configs"])
    return path


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    from lora_trainer.tools.demo import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), count=6, size=64)


@pytest.fixture
def make_config(tmp_path, tiny_sd1, shapes_dataset):
    def make(name="run", **values):
        values.setdefault("train_data_dir", shapes_dataset)
        values.setdefault("base_model", tiny_sd1["single_file"])
        return write_config(tmp_path / name, **values)
    return make
