"""The tiny SD1 model in the form the real WebUI loads from models/Stable-diffusion: the single-file
checkpoint, its LDM config `<stem>.yaml` beside it, and a local CLIP folder (config + tokenizer
files) that the config's text encoder points at, so nothing is fetched from a model hub."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from lora_trainer.backbones import tiny
from lora_trainer.backbones.clip_tokenizer import write_tokenizer_files


def ldm_config(clip_folder: Path) -> dict:
    """LDM config of the tiny model (the same layout as SD1's v1-inference config, tiny widths)."""
    return {"model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
            "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                "attention_resolutions": [1], "num_res_blocks": 2, "channel_mult": [1, 2],
                "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
                "context_dim": 32, "use_checkpoint": False, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                             "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                             "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": str(clip_folder)}},
        },
    }}


def write_tiny_webui_model(models_dir: Path, name: str = "tiny-sd1", seed: int = 0) -> Path:
    """Write models/Stable-diffusion/<name>.safetensors + .yaml and models/tiny-clip/; returns the
    checkpoint path. Another seed is another model (other weights, other fingerprint)."""
    components = tiny.build_tiny_sd1(seed=seed)
    sd_dir = Path(models_dir) / "Stable-diffusion"
    sd_dir.mkdir(parents=True, exist_ok=True)
    clip_folder = Path(models_dir) / "tiny-clip"
    write_tokenizer_files(clip_folder)
    (clip_folder / "config.json").write_text(json.dumps(components["configs"]["text_encoder"], indent=2))
    checkpoint = sd_dir / f"{name}.safetensors"
    tiny.write_single_file(checkpoint, components)
    (sd_dir / f"{name}.yaml").write_text(yaml.safe_dump(ldm_config(clip_folder), sort_keys=False))
    return checkpoint
