"""A diffusers folder is loaded from safetensors only: a part with only .bin weights (PyTorch
pickles, which can run code when loaded) is refused by name before anything is read."""
from __future__ import annotations

import shutil

import pytest

from lora_trainer.backbones.diffusers_sd import ModelLoadError, load_backbone


def test_a_bin_only_part_is_refused_with_its_folder_and_the_reason(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1["folder"], tmp_path / "pickled")
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    # never a real pickle: the refusal must come before any attempt to read it
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelLoadError) as refused:
        load_backbone(str(folder))
    message = str(refused.value)
    assert str(folder / "vae") in message and "diffusion_pytorch_model.bin" in message
    assert "pickle" in message and "safetensors" in message


def test_a_part_without_weights_is_named(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1["folder"], tmp_path / "empty")
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="text_encoder has no .safetensors weights"):
        load_backbone(str(folder))
