"""Shared fixtures: a tiny SD1 model (random weights, built from configs — no network) and small
datasets, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

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
def shapes_dataset(tmp_path_factory) -> Path:
    from lora_trainer.tools.demo import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), count=6, size=64)


def write_config(folder: Path, **values) -> Path:
    """A YAML config in `folder` (paths may be absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = dict(resolution=64, lora_rank=4, batch_size=2, epochs=2, learning_rate=1e-3,
                    output_dir=str(folder / "lora"), output_name="test_lora", save_steps=0,
                    save_precision="fp32", num_threads=1)
    defaults.update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in defaults.items()}))
    return path


@pytest.fixture
def make_config(tmp_path, tiny_sd1, shapes_dataset):
    def make(name="run", **values):
        values.setdefault("train_data_dir", shapes_dataset)
        values.setdefault("base_model", tiny_sd1["single_file"])
        return write_config(tmp_path / name, **values)
    return make
