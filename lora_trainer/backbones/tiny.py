"""A tiny SD1-shaped model built from configs (no downloads), plus writers for the on-disk forms.

The tiny model keeps the SD1 *block layout* (2 resnets per level, attention at every level but
the lowest, VAE factor 8) because the WebUI's LoRA key conversion hard-codes it; only the widths
are small. It builds in a fraction of a second and is what tests and demos train on.

On-disk forms:
- ``write_single_file``: one LDM-layout .safetensors, what the WebUI keeps in models/Stable-diffusion.
- ``write_config_folder``: the diffusers-format config folder (no weights) that
  ``from_single_file(path, config=folder)`` needs to load such a file offline.
- ``write_diffusers_folder``: a complete diffusers pipeline folder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

from .clip_tokenizer import write_tokenizer_files
from .ldm_keys import diffusers_to_ldm

SD1_CONFIG_DIR = Path(__file__).parent / "configs" / "sd1"

_COMPONENT_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}

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

# Std of the values that replace all-zero parameters: small, so the model stays numerically tame.
_ZERO_REPLACEMENT_STD = 0.02


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


def load_config_dicts(folder: str | os.PathLike = SD1_CONFIG_DIR) -> dict:
    """Read a diffusers-format config folder into the same dict shape as ``tiny_sd1_configs()``.

    The default is the packaged real SD1.5 configs.
    """
    folder = Path(folder)
    return {name: json.loads((folder / rel).read_text(encoding="utf-8"))
            for name, rel in _COMPONENT_CONFIG_FILES.items()}


# ---------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------


def build_models_from_configs(configs: Mapping, seed: int = 0, rerandomise_zeros: bool = True) -> dict:
    """Random-init UNet, VAE and text encoder from config dicts, deterministically for ``seed``.

    Runs inside ``torch.random.fork_rng`` so callers' global RNG state is left untouched.
    ``rerandomise_zeros=False`` skips the zero-tensor pass (needed under ``torch.device("meta")``).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_without_private(configs["unet"]))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(_without_private(configs["vae"]))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config_kwargs(configs["text_encoder"])))
    generator = torch.Generator().manual_seed(seed + 3)
    for model in (unet, vae, text_encoder):
        if rerandomise_zeros:
            rerandomise_zero_parameters(model, generator)
        model.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_tiny_sd1(seed: int = 0, with_tokenizer: bool = True) -> dict:
    """The tiny SD1 model: ``dict(unet=, vae=, text_encoder=, tokenizer=, configs=)``."""
    configs = tiny_sd1_configs()
    components = build_models_from_configs(configs, seed)
    components["tokenizer"] = None
    if with_tokenizer:
        from .clip_tokenizer import build_clip_tokenizer

        components["tokenizer"] = build_clip_tokenizer()
    components["configs"] = configs
    return components


def rerandomise_zero_parameters(model, generator) -> int:
    """Replace every all-zero parameter with small normal noise; returns how many were replaced.

    Zero-initialised layers (biases, LDM-style zero_module outputs) would make a LoRA on an
    earlier layer invisible in the output, which tests must be able to see.
    """
    import torch

    replaced = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if not torch.count_nonzero(parameter):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.copy_(noise * _ZERO_REPLACEMENT_STD)
                replaced += 1
    return replaced


def _without_private(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _text_config_kwargs(config: Mapping) -> dict:
    # "architectures"/"model_type" describe the file, they are not constructor arguments here.
    return {k: v for k, v in config.items() if k not in ("architectures", "model_type") and not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# Writing to disk
# ---------------------------------------------------------------------------------------------


def write_single_file(path: str | os.PathLike, components: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Save UNet + VAE + text encoder as one LDM-layout .safetensors (the WebUI's checkpoint form).

    ``components`` needs ``unet``, ``vae``, ``text_encoder`` (models) and ``configs`` (or the
    models' own ``.config`` is used). Written atomically: temp file, fsync, rename.
    """
    from safetensors.torch import save_file

    configs = components.get("configs") or {}
    unet_config = configs.get("unet") or components["unet"].config
    vae_config = configs.get("vae") or components["vae"].config
    ldm = diffusers_to_ldm(components["unet"].state_dict(), components["vae"].state_dict(),
                           components["text_encoder"].state_dict(), unet_config, vae_config)
    tensors = {key: tensor.detach().contiguous() for key, tensor in ldm.items()}
    file_metadata = {"format": "pt", **(metadata or {})}
    path = Path(path)
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=file_metadata))
    return path


def write_config_folder(folder: str | os.PathLike, configs: Mapping) -> Path:
    """A diffusers-format folder with configs and tokenizer but no weights.

    Layout: model_index.json, unet/config.json, vae/config.json, text_encoder/config.json,
    scheduler/scheduler_config.json, tokenizer/{vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json}. Pass it as ``config=`` to diffusers' ``from_single_file``.
    """
    folder = Path(folder)
    for name, relative in _COMPONENT_CONFIG_FILES.items():
        _write_json(folder / relative, _config_for_file(name, configs[name]))
    _write_json(folder / "model_index.json", model_index(configs))
    write_tokenizer_files(folder / "tokenizer")
    return folder


def write_diffusers_folder(folder: str | os.PathLike, components: Mapping) -> Path:
    """A complete diffusers pipeline folder (safetensors weights), loadable with from_pretrained offline."""
    folder = Path(folder)
    configs = components.get("configs") or {}
    components["unet"].save_pretrained(folder / "unet", safe_serialization=True)
    components["vae"].save_pretrained(folder / "vae", safe_serialization=True)
    components["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler = configs.get("scheduler", _SD1_SCHEDULER)
    _write_json(folder / "scheduler" / "scheduler_config.json", _config_for_file("scheduler", scheduler))
    # Written from the BPE file rather than tokenizer.save_pretrained: transformers 5 would only
    # write tokenizer.json, which older transformers (the WebUI's 4.30) cannot read as a CLIPTokenizer.
    write_tokenizer_files(folder / "tokenizer")
    _write_json(folder / "model_index.json", model_index(configs))
    return folder


def model_index(configs: Mapping) -> dict:
    """model_index.json for an SD1 pipeline without safety checker."""
    import diffusers

    scheduler_class = configs.get("scheduler", _SD1_SCHEDULER).get("_class_name", "DDPMScheduler")
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _config_for_file(name: str, config: Mapping) -> dict:
    config = copy.deepcopy(dict(config))
    if name == "text_encoder":
        config.setdefault("model_type", "clip_text_model")
        config.setdefault("architectures", ["CLIPTextModel"])
    else:
        default_class = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDPMScheduler"}[name]
        config.setdefault("_class_name", default_class)
    return config


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _apply_default_permissions(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(path.parent)


def _apply_default_permissions(path: Path) -> None:
    # Some writers create 0600 files; a checkpoint must be readable by e.g. a WebUI run as another user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
