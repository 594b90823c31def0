"""Memory levers of a headless run: base_dtype (half-precision frozen weights), text encoders and
VAE out of memory after caching (read back for previews), per-phase peaks in train.log."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.backbones.diffusers_sd import load_backbone
from lora_trainer.config import ConfigError, load_config
from lora_trainer.app.session import base_dtype, train_from_config


def _lora(result) -> dict:
    from safetensors.torch import load_file

    return load_file(str(result.lora_path))


def test_bf16_base_trains_on_cpu_close_to_fp32(make_config):
    """The measured effect documented for base_dtype: same LoRA up to bf16 rounding."""
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", dict(base_dtype="bf16", mixed_precision="bf16"))):
        cfg = load_config(make_config(name, max_train_steps=4, write_card=False, save_precision="fp32", **extra))
        assert base_dtype(cfg, torch.device("cpu")) == (torch.bfloat16 if name == "bf16" else torch.float32)
        result = train_from_config(cfg)
        assert result.status == "finished"
        runs[name] = _lora(result)
    assert runs["fp32"].keys() == runs["bf16"].keys()
    ups = [k for k in runs["fp32"] if "lora_up" in k]
    fp32, bf16 = (torch.cat([runs[name][k].flatten() for k in ups]) for name in ("fp32", "bf16"))
    cosine = float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=0))
    print(f"bf16 vs fp32 base after 4 steps: cosine of the LoRA up weights {cosine:.4f}, "
          f"relative difference {float((fp32 - bf16).norm() / fp32.norm()):.4f}")
    assert fp32.norm() > 0 and cosine > 0.9   # trained, in nearly the same direction
    for tensor in runs["bf16"].values():
        assert tensor.dtype == torch.float32   # the LoRA itself stays fp32


@pytest.mark.parametrize("bad", [dict(base_dtype="bf16"), dict(base_dtype="fp16", mixed_precision="bf16")])
def test_half_base_without_matching_mixed_precision_names_both_fields(make_config, bad):
    with pytest.raises(ConfigError, match="base_dtype.*mixed_precision"):
        load_config(make_config(**bad))


def test_auto_base_dtype_follows_mixed_precision(make_config):
    cfg = load_config(make_config(mixed_precision="bf16"))
    assert base_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    cfg = load_config(make_config(mixed_precision="bf16", base_dtype="fp32"))
    assert base_dtype(cfg, torch.device("cpu")) == torch.float32


def test_parked_components_come_back_identical(tiny_sd1):
    backbone = load_backbone(str(tiny_sd1["single_file"]))
    before = {name: {k: v.clone() for k, v in module.state_dict().items()}
              for name, module in (("vae", backbone.vae), ("text_encoder", backbone.text_encoder))}
    first = backbone.text_encoder.get_input_embeddings().weight
    assert backbone.park(["vae", "text_encoder"]) == ["vae", "text_encoder"]
    assert backbone.text_encoder.get_input_embeddings().weight.numel() == 0   # the memory is gone
    backbone.encode_text(["a cat"])   # reads the text encoder back; the VAE stays out
    assert backbone.parked == ("vae",)
    backbone.decode_latents(torch.zeros(1, 4, 8, 8))
    assert backbone.parked == ()
    assert backbone.text_encoder.get_input_embeddings().weight is first   # same Parameter objects
    for name, module in (("vae", backbone.vae), ("text_encoder", backbone.text_encoder)):
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, before[name][key]), (name, key)


def test_a_run_parks_what_its_caches_cover_and_logs_phase_peaks(make_config, tmp_path):
    cfg = load_config(make_config(max_train_steps=2, write_card=True, save_precision="fp32",
                                  preview_prompts=["a red square"], preview_every_n_steps=1,
                                  preview_steps=2))
    result = train_from_config(cfg)
    assert result.status == "finished"
    log_text = (result.run_dir / "logs" / "train.log").read_text()
    assert "vae, text_encoder out of memory until a preview" in log_text
    assert "Memory per phase (peak RSS): load " in log_text and "caching" in log_text and "steps" in log_text
    assert len(list((result.run_dir / "previews").rglob("*.png"))) >= 2   # previews read them back


def test_random_crop_parks_nothing(make_config):
    """random_crop: latents are encoded every step (VAE needed), and SDXL's size conditioning
    follows the crop, so the captions are not all cached ahead either."""
    cfg = load_config(make_config(max_train_steps=1, write_card=False, random_crop=True))
    result = train_from_config(cfg)
    log_text = (result.run_dir / "logs" / "train.log").read_text()
    assert result.status == "finished" and "out of memory until a preview" not in log_text


def test_the_webui_model_is_never_parked(make_config):
    """Inside the WebUI the model is the WebUI's: caching drops nothing it needs afterwards."""
    from types import SimpleNamespace

    from lora_trainer.training.memory import parkable_components
    from lora_trainer.webui.backbone import WebuiBackbone

    cfg = load_config(make_config())
    samples = SimpleNamespace(cache_latents=True, conditioning_all_cached=True)
    assert not hasattr(WebuiBackbone, "park")
    assert parkable_components(cfg, samples, object.__new__(WebuiBackbone)) == []


def test_large_images_are_vae_encoded_in_tiles(tiny_sd1, monkeypatch):
    backbone = load_backbone(str(tiny_sd1["single_file"]))
    tiled = []
    real = type(backbone.vae)._tiled_encode
    monkeypatch.setattr(type(backbone.vae), "_tiled_encode", lambda vae, x: tiled.append(x.shape) or real(vae, x))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    whole = backbone.encode_image(pixels, torch.Generator().manual_seed(0))
    backbone.vae_tile_size = 32
    tiles = backbone.encode_image(pixels, torch.Generator().manual_seed(0))
    assert tiled == [(1, 3, 64, 64)] and tiles.shape == whole.shape == (1, 4, 8, 8)
    assert not backbone.vae.use_tiling and backbone.vae.tile_sample_min_size == 64   # put back as it was
