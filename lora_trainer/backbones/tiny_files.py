"""Writing tiny (or any SD1 / SD2 / SDXL) components to disk: the single LDM/SGM-layout
.safetensors the WebUI loads, the diffusers config folder (no weights) that ``from_single_file``
needs offline, a complete diffusers pipeline folder, and the CLIP tokenizer files they include.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

from .clip_tokenizer import EOS_TOKEN, cached_tokenizer_folder
from .ldm_keys import components_to_ldm, layout_for
from .tiny_configs import (_COMPONENT_CONFIG_FILES, _OPTIONAL_CONFIG_FILES, _SD1_SCHEDULER, OPEN_CLIP_PAD_TOKEN,
                           family_of_configs)

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


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
    written = copy.deepcopy(dict(config))
    if name in _TEXT_ENCODERS:
        written.setdefault("model_type", "clip_text_model")
        written.setdefault("architectures", ["CLIPTextModel" if name == "text_encoder" else "CLIPTextModelWithProjection"])
    else:
        default_class = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDPMScheduler"}[name]
        written.setdefault("_class_name", default_class)
    return written


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
