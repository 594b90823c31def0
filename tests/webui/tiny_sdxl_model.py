"""Tiny SDXL and SD2 (v-prediction) models in the form the real WebUI loads from
models/Stable-diffusion, with nothing downloaded:

- the single-file checkpoint (random weights, original SGM / LDM key layout), written by the
  project's own builder (`lora_trainer.backbones.tiny.build_tiny` + `write_single_file`);
- its config `<stem>.yaml` beside it (the WebUI prefers it to guessing), derived from the config
  the WebUI itself would pick for the family (SDXL: repositories/generative-models/configs/
  inference/sd_xl_base.yaml; SD2-v: repositories/stable-diffusion-stability-ai/configs/
  stable-diffusion/v2-inference-v.yaml) with the tiny model's widths;
- the OpenCLIP text tower's architecture as an open_clip model-config json (`<arch>.json`): the
  WebUI builds that tower with `open_clip.create_model_and_transforms(arch, pretrained=None)`, so
  the arch must be registered (`open_clip.add_model_config(folder)`) in the WebUI process before
  the checkpoint loads; `open_clip_registration_script` is the extension script that does it;
- a local CLIP-L folder (config.json + tokenizer files) that the config's CLIP-L embedder points at.

The tiny widths (see `lora_trainer.backbones.tiny.tiny_sdxl_configs` / `tiny_sd2_configs`):

| SDXL yaml                            | sd_xl_base  | tiny                          |
|--------------------------------------|-------------|-------------------------------|
| network adm_in_channels              | 2816        | 1600 = 64 pooled + 3 x 2 x 256 |
| network model_channels / channel_mult| 320 [1,2,4] | 32 [1,2,2]                    |
| network num_head_channels            | 64          | 16                            |
| network transformer_depth            | [1,2,10]    | [1,1,2]                       |
| network context_dim                  | 2048        | 96 = 32 (CLIP-L) + 64 (OpenCLIP) |
| CLIP-L layer_idx                     | 11          | 1 (penultimate of 2 layers)   |
| OpenCLIP arch / version              | ViT-bigG-14 | tiny-openclip-sdxl / none     |
| VAE ch / ch_mult / num_res_blocks    | 128 [1,2,4,4] 2 | 32 [1,1,1,1] 1            |
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from lora_trainer.backbones import tiny
from lora_trainer.backbones.clip_tokenizer import write_tokenizer_files

SDXL_ARCH = "tiny-openclip-sdxl"
SD2_ARCH = "tiny-openclip-sd2"
SDXL_BASE_YAML = Path("repositories/generative-models/configs/inference/sd_xl_base.yaml")
SD2_V_YAML = Path("repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference-v.yaml")


def open_clip_config(text_config: dict, layers: int) -> dict:
    """open_clip's model config of a text tower like `text_config` (the transformers config of the
    tiny OpenCLIP encoder): exact GELU (open_clip's default), its width, heads and `layers`
    resblocks. The vision tower is required by open_clip but deleted by the WebUI's embedders."""
    width = int(text_config["hidden_size"])
    return {
        "embed_dim": int(text_config["projection_dim"]),
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": int(text_config["max_position_embeddings"]),
                     "vocab_size": int(text_config["vocab_size"]), "width": width,
                     "heads": int(text_config["num_attention_heads"]), "layers": layers},
    }


def _clip_folder(models_dir: Path, text_config: dict) -> Path:
    folder = models_dir / "tiny-clip-l"
    write_tokenizer_files(folder)
    (folder / "config.json").write_text(json.dumps(text_config, indent=2))
    return folder


def _sd_dir(models_dir: Path) -> Path:
    sd_dir = models_dir / "Stable-diffusion"
    sd_dir.mkdir(parents=True, exist_ok=True)
    return sd_dir


def sdxl_config(webui_dir: Path, clip_folder: Path) -> dict:
    """The WebUI's sd_xl_base.yaml with the tiny widths (table above)."""
    config = yaml.safe_load((Path(webui_dir) / SDXL_BASE_YAML).read_text())
    params = config["model"]["params"]
    net = params["network_config"]["params"]
    net.update(adm_in_channels=64 + 3 * 2 * 256, model_channels=32, channel_mult=[1, 2, 2],
               num_head_channels=16, transformer_depth=[1, 1, 2], context_dim=96)
    embedders = params["conditioner_config"]["params"]["emb_models"]
    assert embedders[0]["target"].endswith("FrozenCLIPEmbedder"), embedders[0]
    embedders[0]["params"].update(layer_idx=1, version=str(clip_folder))
    assert embedders[1]["target"].endswith("FrozenOpenCLIPEmbedder2"), embedders[1]
    embedders[1]["params"].update(arch=SDXL_ARCH, version=None)
    vae = params["first_stage_config"]["params"]["ddconfig"]
    vae.update(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    return config


def write_tiny_sdxl_model(models_dir: Path, webui_dir: Path, openclip_dir: Path, name: str = "tiny-sdxl",
                          seed: int = 0) -> Path:
    """models/Stable-diffusion/<name>.safetensors + .yaml, models/tiny-clip-l/ and
    `openclip_dir/tiny-openclip-sdxl.json`; returns the checkpoint path."""
    models_dir, openclip_dir = Path(models_dir), Path(openclip_dir)
    components = tiny.build_tiny("sdxl", seed=seed, with_tokenizer=False)
    configs = components["configs"]
    clip_folder = _clip_folder(models_dir, configs["text_encoder"])
    openclip_dir.mkdir(parents=True, exist_ok=True)
    te2 = configs["text_encoder_2"]
    (openclip_dir / f"{SDXL_ARCH}.json").write_text(
        json.dumps(open_clip_config(te2, int(te2["num_hidden_layers"])), indent=2))
    checkpoint = _sd_dir(models_dir) / f"{name}.safetensors"
    tiny.write_single_file(checkpoint, components)
    checkpoint.with_suffix(".yaml").write_text(
        yaml.safe_dump(sdxl_config(webui_dir, clip_folder), sort_keys=False))
    return checkpoint


def sd2_v_config(webui_dir: Path) -> dict:
    """The WebUI's v2-inference-v.yaml (SD2.1-768, v-prediction) with the tiny SD2 widths: the
    UNet of tiny_sd2_configs (32/64 channels, attention at the first level only, 16-channel heads,
    linear proj_in/out, 64-wide context), a 3-resblock OpenCLIP tower run to its penultimate layer,
    the tiny VAE."""
    config = yaml.safe_load((Path(webui_dir) / SD2_V_YAML).read_text())
    params = config["model"]["params"]
    assert params.get("parameterization") == "v"
    params["image_size"] = 8
    unet = params["unet_config"]["params"]
    unet.update(use_checkpoint=False, use_fp16=False, image_size=8, model_channels=32,
                attention_resolutions=[1], num_res_blocks=2, channel_mult=[1, 2], num_head_channels=16,
                transformer_depth=1, context_dim=64)
    vae = params["first_stage_config"]["params"]["ddconfig"]
    vae.update(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, resolution=64)
    params["cond_stage_config"]["params"].update(arch=SD2_ARCH, version=None)
    return config


def write_tiny_sd2_v_model(models_dir: Path, webui_dir: Path, openclip_dir: Path, name: str = "tiny-sd2-v",
                           seed: int = 0) -> Path:
    """models/Stable-diffusion/<name>.safetensors + .yaml and `openclip_dir/tiny-openclip-sd2.json`
    (the file holds 3 resblocks: the 2 the model runs and SD2's unused last one)."""
    models_dir, openclip_dir = Path(models_dir), Path(openclip_dir)
    components = tiny.build_tiny("sd2-v", seed=seed, with_tokenizer=False)
    te = components["configs"]["text_encoder"]
    openclip_dir.mkdir(parents=True, exist_ok=True)
    (openclip_dir / f"{SD2_ARCH}.json").write_text(
        json.dumps(open_clip_config(te, int(te["num_hidden_layers"]) + 1), indent=2))
    checkpoint = _sd_dir(models_dir) / f"{name}.safetensors"
    tiny.write_single_file(checkpoint, components)
    checkpoint.with_suffix(".yaml").write_text(yaml.safe_dump(sd2_v_config(webui_dir), sort_keys=False))
    return checkpoint


def open_clip_registration_script(openclip_dir: Path) -> str:
    """An extension script (scripts/*.py) that registers the tiny open_clip archs when the WebUI
    loads its scripts, which is before it loads the checkpoint."""
    return ("import open_clip\n"
            f"open_clip.add_model_config({str(Path(openclip_dir))!r})\n")
