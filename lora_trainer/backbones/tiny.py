"""Tiny SD1 / SD2 / SDXL models built from configs (no downloads), plus writers for the on-disk forms.

The tiny models keep their family's real *block layout* (SD1/SD2: 2 resnets per level, attention at
every level but the lowest; SDXL: no attention at the first level, 2 transformer blocks at the
last, ``label_emb``; VAE factor 8) because the WebUI's LoRA key conversion and its SGM loader
hard-code those layouts; only the widths are small. Each builds in a fraction of a second
(``build_tiny(family, seed)``) and is what tests and demos train on.

On-disk forms:
- ``write_single_file``: one LDM-layout .safetensors, what the WebUI keeps in models/Stable-diffusion.
- ``write_config_folder``: the diffusers-format config folder (no weights) that
  ``from_single_file(path, config=folder)`` needs to load such a file offline.
- ``write_diffusers_folder``: a complete diffusers pipeline folder.

This module builds the models; the config dicts live in ``tiny_configs.py`` and the writers in
``tiny_files.py``. Everything is re-exported here, where callers import it from.
"""

from __future__ import annotations

from typing import Mapping

from .clip_tokenizer import EOS_TOKEN
from .ldm_keys import open_clip_from_hf
from .tiny_configs import (CONFIG_ROOT, FAMILIES, OPEN_CLIP_PAD_TOKEN, SD1_CONFIG_DIR, SHIPPED_CONFIG_DIRS,
                           family_of_configs, load_config_dicts, tiny_configs, tiny_sd1_configs, tiny_sd2_configs,
                           tiny_sdxl_configs)
from .tiny_files import (model_index, write_config_folder, write_diffusers_folder, write_single_file,
                         write_tokenizer_folder)

# open_clip's initial logit scale, ln(1/0.07); only its contrastive loss reads it.
_OPEN_CLIP_LOGIT_SCALE = 2.6592600345611572

# Std of the values that replace all-zero parameters: small, so the model stays numerically tame.
_ZERO_REPLACEMENT_STD = 0.02


# ---------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------


def build_models_from_configs(configs: Mapping, seed: int = 0, rerandomise_zeros: bool = True) -> dict:
    """Random-init UNet, VAE and text encoder(s) from config dicts, deterministically for ``seed``.

    Runs inside ``torch.random.fork_rng`` so callers' global RNG state is left untouched.
    ``rerandomise_zeros=False`` skips the zero-tensor pass (needed under ``torch.device("meta")``).
    A ``text_encoder_2`` config (SDXL) adds that model; each text encoder's class follows its
    config's ``architectures`` (CLIPTextModel or CLIPTextModelWithProjection).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_without_private(configs["unet"]))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(_without_private(configs["vae"]))
        torch.manual_seed(seed + 2)
        models = {"unet": unet, "vae": vae, "text_encoder": build_text_encoder(configs["text_encoder"])}
        if configs.get("text_encoder_2"):
            torch.manual_seed(seed + 4)
            models["text_encoder_2"] = build_text_encoder(configs["text_encoder_2"])
    generator = torch.Generator().manual_seed(seed + 3)
    for model in models.values():
        if rerandomise_zeros:
            rerandomise_zero_parameters(model, generator)
        model.eval()
    return models


def build_text_encoder(config: Mapping):
    """A transformers CLIP text model from a config dict; the class follows ``architectures``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = any("WithProjection" in name for name in config.get("architectures") or ())
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(CLIPTextConfig(**_text_config_kwargs(config)))


def build_tiny_sd1(seed: int = 0, with_tokenizer: bool = True) -> dict:
    """The tiny SD1 model: ``dict(unet=, vae=, text_encoder=, tokenizer=, configs=, family=)``."""
    return build_tiny("sd1", seed, with_tokenizer)


def build_tiny(family: str = "sd1", seed: int = 0, with_tokenizer: bool = True) -> dict:
    """The tiny model of ``family`` ("sd1", "sd2", "sd2-v", "sdxl"), with no all-zero tensor.

    Returns ``dict(unet=, vae=, text_encoder=, tokenizer=, configs=, family=, extras=)`` plus
    ``text_encoder_2=``, ``tokenizer_2=`` for SDXL. ``extras`` are the single-file tensors the
    diffusers models do not hold (``ldm_keys.SplitCheckpoint``): for SD2 the OpenCLIP tower's
    last resblock, its text_projection and logit_scale; for SDXL the second encoder's logit_scale.
    ``write_single_file`` writes them, so the file has every key a real checkpoint has.
    """
    import torch

    configs = tiny_configs(family)
    components = build_models_from_configs(configs, seed)
    components["extras"] = {}
    if family in ("sd2", "sd2-v"):
        components["extras"]["text_encoder"] = _open_clip_surplus_layer(configs["text_encoder"], seed + 5)
    if family == "sdxl":
        components["extras"]["text_encoder_2"] = {"logit_scale": torch.tensor(_OPEN_CLIP_LOGIT_SCALE)}
    components["tokenizer"] = None
    if with_tokenizer:
        components["tokenizer"] = build_tokenizer(OPEN_CLIP_PAD_TOKEN if family in ("sd2", "sd2-v") else EOS_TOKEN)
        if family == "sdxl":
            components["tokenizer_2"] = build_tokenizer(OPEN_CLIP_PAD_TOKEN)
    elif family == "sdxl":
        components["tokenizer_2"] = None
    components["configs"] = configs
    components["family"] = family
    return components


def _open_clip_surplus_layer(te_config: Mapping, seed: int) -> dict:
    """What a real SD2 file holds beyond diffusers' text encoder: one more resblock (the last,
    which SD2 never runs), the tower's text_projection and logit_scale -- as open_clip keys."""
    import torch

    one_layer = dict(te_config, num_hidden_layers=1, architectures=["CLIPTextModelWithProjection"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_text_encoder(one_layer)
    rerandomise_zero_parameters(model, torch.Generator().manual_seed(seed))
    tower = open_clip_from_hf(model.state_dict())
    index = int(te_config["num_hidden_layers"])
    surplus = {key.replace("transformer.resblocks.0.", f"transformer.resblocks.{index}."): tensor.detach().clone()
               for key, tensor in tower.items() if key.startswith("transformer.resblocks.0.")}
    surplus["text_projection"] = tower["text_projection"].detach().clone()
    surplus["logit_scale"] = torch.tensor(_OPEN_CLIP_LOGIT_SCALE)
    return surplus


def build_tokenizer(pad_token: str = EOS_TOKEN):
    """The real CLIP tokenizer, padding with ``pad_token`` ("!" for OpenCLIP encoders)."""
    from .clip_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    if pad_token != tokenizer.pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer


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


__all__ = [
    "CONFIG_ROOT", "EOS_TOKEN", "FAMILIES", "OPEN_CLIP_PAD_TOKEN", "SD1_CONFIG_DIR", "SHIPPED_CONFIG_DIRS",
    "build_models_from_configs", "build_text_encoder", "build_tiny", "build_tiny_sd1", "build_tokenizer",
    "family_of_configs", "load_config_dicts", "model_index", "rerandomise_zero_parameters", "tiny_configs",
    "tiny_sd1_configs", "tiny_sd2_configs", "tiny_sdxl_configs", "write_config_folder",
    "write_diffusers_folder", "write_single_file", "write_tokenizer_folder",
]
