"""The tiny models' configs as plain data: the diffusers/transformers config dicts of the tiny
SD1 / SD2 / SD2-v / SDXL models, the packaged real config folders, and the reader that loads such a
folder into the same dict shape. Nothing here imports torch; building models from these dicts is in
`tiny.py`, writing them to disk in `tiny_files.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

CONFIG_ROOT = Path(__file__).parent / "configs"
SD1_CONFIG_DIR = CONFIG_ROOT / "sd1"
# The packaged real configs: SD1.5, SD2.1-base (512, epsilon), SD2.1 (768, v-prediction), SDXL base 1.0.
SHIPPED_CONFIG_DIRS = {name: CONFIG_ROOT / name for name in ("sd1", "sd2", "sd2-v", "sdxl")}

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

_COMPONENT_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
_OPTIONAL_CONFIG_FILES = {"text_encoder_2": "text_encoder_2/config.json"}

# OpenCLIP's tokenizer pads with token 0 ("!"), OpenAI CLIP's (SD1, SDXL's first) with <|endoftext|>;
# the released SD2 tokenizer/ and SDXL tokenizer_2/ folders say so in their configs.
OPEN_CLIP_PAD_TOKEN = "!"

_SD1_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def tiny_sd1_configs() -> dict:
    """Configs (plain dicts, diffusers/transformers format) of the tiny SD1-layout model."""
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,  # latent size for 64 px images
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 32,
        # diffusers' historical misnomer: for SD1 UNets "attention_head_dim" is the number of heads.
        "attention_head_dim": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 32, 32, 32],  # 4 levels -> factor 8, like SD; 32 for GroupNorm(32)
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }
    text_encoder = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,  # the real CLIP vocabulary: the real tokenizer works unchanged
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": dict(_SD1_SCHEDULER)}


def tiny_sd2_configs(prediction_type: str = "epsilon") -> dict:
    """The tiny SD2 model: SD1's tiny block layout with SD2's differences.

    Linear proj_in/out (``use_linear_projection``), per-level head counts, an OpenCLIP-style text
    encoder (hidden 64, exact GELU) that is 64-wide cross-attention context. diffusers keeps 2 text
    layers; the single file holds a 3-resblock OpenCLIP tower, as the real SD2 holds 24 for
    diffusers' 23 (``build_tiny`` makes the surplus layer). ``prediction_type="v_prediction"``
    is the tiny counterpart of SD2.1-768 (only the scheduler differs).
    """
    configs = tiny_sd1_configs()
    configs["unet"].update({
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4],  # heads per level (diffusers' misnomer), like SD2's [5, 10, 20, 20]
        "use_linear_projection": True,
        "upcast_attention": prediction_type == "v_prediction",
    })
    configs["text_encoder"].update({
        "hidden_size": 64,
        "intermediate_size": 256,  # open_clip mlp_ratio 4
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "gelu",  # open_clip uses nn.GELU (erf), OpenAI CLIP quick_gelu
        "projection_dim": 64,
    })
    configs["scheduler"]["prediction_type"] = prediction_type
    return configs


def tiny_sdxl_configs() -> dict:
    """The tiny SDXL model, as the prototype checkpoint that loaded in the real WebUI (SGM layout).

    SGM: model_channels 32, channel_mult [1, 2, 2], num_res_blocks 2, attention_resolutions [4, 2],
    num_head_channels 16, transformer_depth [1, 1, 2] (the first level has no attention, so its
    depth is unused; the middle block takes the last), context_dim 96 = 32 (CLIP-L) + 64 (OpenCLIP),
    adm_in_channels 1600 = 64 (pooled OpenCLIP) + 6 x 256 (size/crop/target embeddings).
    """
    base = tiny_sd1_configs()
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 96,
        "attention_head_dim": [2, 4, 4],  # heads per level: channels / 16
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 64 + 6 * 256,
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
    }
    vae = dict(base["vae"], scaling_factor=0.13025, force_upcast=True)
    text_encoder_2 = dict(base["text_encoder"], **{
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "gelu",
        "projection_dim": 64,
    })
    return {"unet": unet, "vae": vae, "text_encoder": base["text_encoder"], "text_encoder_2": text_encoder_2,
            "scheduler": base["scheduler"]}


def tiny_configs(family: str) -> dict:
    """Config dicts of the tiny model of ``family`` ("sd1", "sd2", "sd2-v", "sdxl")."""
    if family == "sd1":
        return tiny_sd1_configs()
    if family == "sd2":
        return tiny_sd2_configs("epsilon")
    if family == "sd2-v":
        return tiny_sd2_configs("v_prediction")
    if family == "sdxl":
        return tiny_sdxl_configs()
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def family_of_configs(configs: Mapping) -> str:
    """"sdxl" if there is a second text encoder, "sd2"/"sd2-v" for an OpenCLIP (exact-GELU) text
    encoder (by the scheduler's prediction_type), else "sd1"."""
    if configs.get("text_encoder_2"):
        return "sdxl"
    if configs["text_encoder"].get("hidden_act") == "gelu":
        scheduler = configs.get("scheduler") or {}
        return "sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"


def load_config_dicts(folder: str | os.PathLike = SD1_CONFIG_DIR) -> dict:
    """Read a diffusers-format config folder into the same dict shape as ``tiny_configs()``.

    The default is the packaged real SD1.5 configs; ``SHIPPED_CONFIG_DIRS`` names the others.
    ``text_encoder_2`` is read when the folder has one (SDXL).
    """
    folder = Path(folder)
    configs = {name: json.loads((folder / rel).read_text(encoding="utf-8"))
               for name, rel in _COMPONENT_CONFIG_FILES.items()}
    for name, rel in _OPTIONAL_CONFIG_FILES.items():
        if (folder / rel).is_file():
            configs[name] = json.loads((folder / rel).read_text(encoding="utf-8"))
    return configs
