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
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

from .clip_tokenizer import EOS_TOKEN, cached_tokenizer_folder
from .ldm_keys import components_to_ldm, layout_for, open_clip_from_hf

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
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# OpenCLIP's tokenizer pads with token 0 ("!"), OpenAI CLIP's (SD1, SDXL's first) with <|endoftext|>;
# the released SD2 tokenizer/ and SDXL tokenizer_2/ folders say so in their configs.
OPEN_CLIP_PAD_TOKEN = "!"
# open_clip's initial logit scale, ln(1/0.07); only its contrastive loss reads it.
_OPEN_CLIP_LOGIT_SCALE = 2.6592600345611572

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


# ---------------------------------------------------------------------------------------------
# Writing to disk
# ---------------------------------------------------------------------------------------------


def write_single_file(path: str | os.PathLike, components: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Save UNet + VAE + text encoder(s) as one LDM/SGM-layout .safetensors (the WebUI's checkpoint form).

    ``components`` needs ``unet``, ``vae``, ``text_encoder`` (+ ``text_encoder_2`` for SDXL) and
    ``configs`` (or the models' own ``.config`` is used); ``family`` (else judged from the configs,
    see ``family_of_configs``) picks the layout; ``extras`` (optional) are written as well.
    Written atomically: temp file, fsync, rename.
    """
    from ..storage.atomic import atomic_write_bytes, safetensors_bytes

    configs = components.get("configs") or {}
    family = components.get("family") or family_of_configs(_configs_of(components))
    state_dicts = {name: components[name].state_dict() for name in ("unet", "vae", *_TEXT_ENCODERS)
                   if components.get(name) is not None}
    model_configs = {"unet": configs.get("unet") or components["unet"].config,
                     "vae": configs.get("vae") or components["vae"].config}
    ldm = components_to_ldm(state_dicts, model_configs, layout_for(family), components.get("extras"))
    tensors = {key: tensor.detach().contiguous() for key, tensor in ldm.items()}
    file_metadata = {"format": "pt", **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=file_metadata))
    return path


def _configs_of(components: Mapping) -> dict:
    configs = dict(components.get("configs") or {})
    for name in _TEXT_ENCODERS:
        if name not in configs and components.get(name) is not None:
            configs[name] = components[name].config.to_dict()
    return configs


def write_config_folder(folder: str | os.PathLike, configs: Mapping) -> Path:
    """A diffusers-format folder with configs and tokenizer(s) but no weights.

    Layout: model_index.json, unet/config.json, vae/config.json, text_encoder/config.json,
    scheduler/scheduler_config.json, tokenizer/{vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json}; SDXL adds text_encoder_2/config.json and tokenizer_2/. Pass it as
    ``config=`` to diffusers' ``from_single_file``.
    """
    folder = Path(folder)
    family = family_of_configs(configs)
    for name, relative in {**_COMPONENT_CONFIG_FILES, **_OPTIONAL_CONFIG_FILES}.items():
        if name in configs:
            _write_json(folder / relative, _config_for_file(name, configs[name]))
    _write_json(folder / "model_index.json", model_index(configs))
    _write_tokenizers(folder, family)
    return folder


def write_diffusers_folder(folder: str | os.PathLike, components: Mapping) -> Path:
    """A complete diffusers pipeline folder (safetensors weights), loadable with from_pretrained offline."""
    folder = Path(folder)
    configs = _configs_of(components)
    family = components.get("family") or family_of_configs(configs)
    for name in ("unet", "vae", *_TEXT_ENCODERS):
        if components.get(name) is not None:
            components[name].save_pretrained(folder / name, safe_serialization=True)
    scheduler = configs.get("scheduler", _SD1_SCHEDULER)
    _write_json(folder / "scheduler" / "scheduler_config.json", _config_for_file("scheduler", scheduler))
    # Written from the BPE file rather than tokenizer.save_pretrained: transformers 5 would only
    # write tokenizer.json, which older transformers (the WebUI's 4.30) cannot read as a CLIPTokenizer.
    _write_tokenizers(folder, family)
    _write_json(folder / "model_index.json", model_index(configs))
    return folder


def _write_tokenizers(folder: Path, family: str) -> None:
    if family == "sdxl":
        write_tokenizer_folder(folder / "tokenizer", EOS_TOKEN)
        write_tokenizer_folder(folder / "tokenizer_2", OPEN_CLIP_PAD_TOKEN)
    else:
        write_tokenizer_folder(folder / "tokenizer", OPEN_CLIP_PAD_TOKEN if family.startswith("sd2") else EOS_TOKEN)


def write_tokenizer_folder(folder: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """The CLIP tokenizer files (vocab.json, merges.txt, configs), padding with ``pad_token``.

    Copies the cached generated folder (``clip_tokenizer.cached_tokenizer_folder``), then sets
    the pad token in tokenizer_config.json and special_tokens_map.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = cached_tokenizer_folder()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, folder / name)
    if pad_token != EOS_TOKEN:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            data["pad_token"] = pad_token
            (folder / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def model_index(configs: Mapping) -> dict:
    """model_index.json for an SD1/SD2 pipeline without safety checker, or an SDXL pipeline."""
    import diffusers

    scheduler_class = configs.get("scheduler", _SD1_SCHEDULER).get("_class_name", "DDPMScheduler")
    index = {
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
    if family_of_configs(configs) == "sdxl":
        for key in ("requires_safety_checker", "safety_checker"):
            del index[key]
        index.update({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        })
    return index


def _config_for_file(name: str, config: Mapping) -> dict:
    config = copy.deepcopy(dict(config))
    if name in _TEXT_ENCODERS:
        config.setdefault("model_type", "clip_text_model")
        config.setdefault("architectures", ["CLIPTextModel" if name == "text_encoder" else "CLIPTextModelWithProjection"])
    else:
        default_class = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDPMScheduler"}[name]
        config.setdefault("_class_name", default_class)
    return config


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
