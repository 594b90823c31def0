"""Load an SD1 / SD2 / SDXL base model offline into diffusers components.

Two sources, one result shape (what ``DiffusersBackbone`` is built from)::

    dict(unet=, vae=, text_encoder=, tokenizer=, scheduler_config=, family=, source=, source_hash=,
         detected=)  # detected: one line saying what was found and which configs/prediction type
    # SDXL adds text_encoder_2=, tokenizer_2=

- ``load_single_file(path, base_model_config=None)``: a WebUI-style .safetensors (LDM / SGM layout).
  The family comes from the keys (``ldm_keys.detect_family_and_variant``); the configs from
  ``base_model_config``, else a ``<stem>.config/`` folder beside the file, else the shipped
  configs of the family (``configs/sd1``, ``sd2``, ``sd2-v``, ``sdxl``).
- ``load_folder(path)``: a diffusers pipeline folder.
- ``describe_model(base_model, base_model_config=None)``: what would be loaded and why, without
  reading any weights (for logs, the UI, error messages).

SD2 epsilon vs v-prediction: the weights do not tell (SD2.1-base and SD2.1-768-v have identical
keys and shapes). ``choose_config_folder`` decides, in this order, and says which rule decided:
1. ``base_model_config`` (its scheduler's ``prediction_type``);
2. a ``<stem>.config/`` diffusers folder beside the file (likewise);
3. the file's ``modelspec.prediction_type`` metadata ("epsilon" / "v");
4. a ``<stem>.yaml`` beside the file (the WebUI's per-checkpoint config): ``parameterization: "v"``
   under ``model.params`` means v-prediction, a yaml without it means epsilon (the LDM default);
5. otherwise the shipped ``sd2-v`` (768 px, v-prediction): SD 2.0-768 and 2.1-768 are the
   flagship SD2 releases and most SD2 fine-tunes descend from them. A 512-base (epsilon) model
   needs ``base_model_config: <package>/backbones/configs/sd2`` or one of the hints above.

No pickle: .ckpt files are refused. Nothing is fetched from a hub.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..diffusion.families import FAMILIES, OPEN_CLIP, family_row
from .safetensors_header import read_key_shapes  # noqa: F401  (public here since before)
from .ldm_keys import (CheckpointKeyError, UnsupportedCheckpointError, detect_family_and_variant, layout_for,
                       ldm_to_components)
from .tiny import (EOS_TOKEN, OPEN_CLIP_PAD_TOKEN, SHIPPED_CONFIG_DIRS, build_text_encoder, build_tokenizer,
                   family_of_configs, load_config_dicts)

log = logging.getLogger(__name__)

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModelDescription:
    family: str  # "sd1" | "sd2" | "sdxl"
    variant: str  # the config set: "sd1" | "sd2" | "sd2-v" | "sdxl" (or "custom" for a user folder)
    description: str  # what the weights/configs show
    config_folder: Path | None  # the configs used (None for a diffusers folder: its own)
    config_reason: str  # why those configs (and, for SD2, why that prediction type)
    prediction_type: str  # "epsilon" | "v_prediction"

    def summary(self) -> str:
        return f"{self.description}; configs: {self.config_reason}; prediction type {self.prediction_type}"


def _load_error(message: str) -> Exception:
    from .diffusers_sd import ModelLoadError  # lazy: diffusers_sd may import this module

    return ModelLoadError(message)


# ---- deciding what a file is ------------------------------------------------------------------------

def describe_model(base_model: str, base_model_config: str | None = None) -> ModelDescription:
    """What ``load_single_file`` / ``load_folder`` would load and why; reads no weights."""
    path = Path(base_model)
    if path.is_dir():
        return _describe_folder(path)
    _check_single_file(path)
    try:
        shapes, metadata = read_key_shapes(path)
    except Exception as e:  # safetensors raises its own error type (or OSError) for a non-model
        raise _load_error(f"base_model: {path} is not a model: not a readable .safetensors file ({e}). "
                          "Expected a Stable Diffusion checkpoint (SD1, SD2 or SDXL .safetensors) or a "
                          "diffusers model folder") from e
    try:
        detected = detect_family_and_variant(shapes)
    except UnsupportedCheckpointError as e:
        raise _load_error(f"base_model: {path}: {e}") from e
    folder, variant, reason, prediction = choose_config_folder(path, detected.family, base_model_config, metadata)
    return ModelDescription(detected.family, variant, detected.description, folder, reason, prediction)


def choose_config_folder(checkpoint: Path, family: str, base_model_config: str | None = None,
                         metadata: Mapping[str, str] | None = None) -> tuple[Path, str, str, str]:
    """(config folder, variant, reason, prediction_type) for a single file of ``family``.

    See the module docstring for the order of the rules. A given or sibling folder must hold
    configs of the detected family.
    """
    checkpoint = Path(checkpoint)
    for folder, why in ((base_model_config, "base_model_config"),
                        (checkpoint.with_suffix(".config"), f"{checkpoint.with_suffix('.config').name}/ beside the file")):
        if folder is None:
            continue
        folder = Path(folder)
        if not (folder / "unet" / "config.json").is_file():
            if why == "base_model_config":
                raise _load_error(f"base_model_config: {folder} is not a diffusers config folder (no unet/config.json)")
            continue
        configs = load_config_dicts(folder)
        folder_family = family_of_configs(configs)
        if folder_family.split("-")[0] != family:
            raise _load_error(f"{why} {folder} holds {folder_family} configs, but {checkpoint.name} is {family}")
        prediction = configs["scheduler"].get("prediction_type", "epsilon")
        return folder, "custom", f"{why} ({folder})", prediction
    if family != "sd2":
        return SHIPPED_CONFIG_DIRS[family], family, f"shipped {family} configs", "epsilon"
    variant, why = _sd2_variant(checkpoint, metadata or {})
    prediction = "v_prediction" if variant == "sd2-v" else "epsilon"
    return SHIPPED_CONFIG_DIRS[variant], variant, f"shipped {variant} configs: {why}", prediction


def _sd2_variant(checkpoint: Path, metadata: Mapping[str, str]) -> tuple[str, str]:
    hint = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if hint in ("v", "v_prediction", "v-prediction"):
        return "sd2-v", f"the file's modelspec.prediction_type is {hint!r}"
    if hint in ("epsilon", "eps"):
        return "sd2", f"the file's modelspec.prediction_type is {hint!r}"
    yaml_path = checkpoint.with_suffix(".yaml")
    if yaml_path.is_file():
        parameterization = _yaml_parameterization(yaml_path)
        if parameterization == "v":
            return "sd2-v", f"{yaml_path.name} sets parameterization: v"
        if parameterization is not None:
            return "sd2", f"{yaml_path.name} has parameterization {parameterization!r} (not v)"
    return "sd2-v", ("no prediction-type hint (base_model_config, <stem>.config/, modelspec.prediction_type, "
                     "<stem>.yaml); assumed SD2-768 v-prediction -- for a 512-base epsilon model set "
                     f"base_model_config to {SHIPPED_CONFIG_DIRS['sd2']}")


def _yaml_parameterization(path: Path) -> str | None:
    """``model.params.parameterization`` of an LDM yaml: "v", "eps" (also when absent), or None if unreadable."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = data["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        log.warning("could not read model.params from %s; ignoring it", path)
        return None
    return str(params.get("parameterization", "eps"))


def _describe_folder(path: Path) -> ModelDescription:
    if not (path / "unet" / "config.json").is_file():
        raise _load_error(f"base_model: {path} is a folder but not a diffusers model (no unet/config.json)")
    configs = load_config_dicts(path)
    variant = family_of_configs(configs)
    family = variant.split("-")[0]
    widths = ", ".join(f"{name} {configs[name]['hidden_size']}-wide {configs[name].get('hidden_act')}"
                       for name in _TEXT_ENCODERS if name in configs)
    unet = configs["unet"]
    description = (f"{family.upper()} diffusers folder ({widths}; UNet {unet['block_out_channels'][0]} base channels, "
                   f"cross-attention {unet.get('cross_attention_dim')})")
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    reason = "the folder's own configs (text_encoder_2 -> SDXL; exact-GELU text encoder -> SD2)"
    return ModelDescription(family, variant, description, None, reason, prediction)


def _check_single_file(path: Path) -> None:
    if not path.is_file():
        raise _load_error(f"base_model: {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise _load_error(f"base_model: {path}: only .safetensors single files are loaded "
                          "(.ckpt files are pickles, which this project never loads)")


def family_for(info: ModelDescription):
    """The Family (names, metadata, native resolution) of a described model."""
    return family_row(info.family, info.prediction_type)


def _check_folder_weights(path: Path, parts: list[str]) -> None:
    """Every model part of a diffusers folder must have safetensors weights. A part with only
    .bin files is refused here, by name: those are pickles, which can run code when loaded, and
    which this project never loads (from_pretrained also gets use_safetensors=True)."""
    for part in parts:
        folder = path / part
        if any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(f.name for f in folder.glob("*.bin"))
        if pickles:
            raise _load_error(f"base_model: {folder} holds only {', '.join(pickles)} (PyTorch pickle "
                              "files, which can run code when loaded; this project loads safetensors "
                              "only). Convert the folder to safetensors, or use a .safetensors "
                              "single-file checkpoint")
        raise _load_error(f"base_model: {folder} has no .safetensors weights")


# ---- loading ---------------------------------------------------------------------------------------

def load_single_file(path: str | Path, base_model_config: str | None = None, dtype=None, device="cpu") -> dict:
    """Load a WebUI-style single-file checkpoint (SD1, SD2 or SDXL base) into diffusers components.

    The UNet and text encoders come out in ``dtype`` (default float32) on ``device``, the VAE in
    float32 on ``device``; tensors are streamed from the file one by one (see streaming.py), so the
    load never holds more than the finished models plus one tensor.
    """
    import torch

    from .diffusers_sd import fingerprint_file
    from .safetensors_header import SafetensorsFormatError
    from .streaming import plan_from_meta, read_index

    path = Path(path)
    info = describe_model(str(path), base_model_config)
    log.info("%s: %s", path.name, info.summary())
    assert info.config_folder is not None   # a single file is always described with its configs
    configs = load_config_dicts(info.config_folder)
    try:
        index = read_index(path)
        meta = index.meta_state_dict()
        split = ldm_to_components(meta, configs, layout_for(info.family))
        models = _empty_models(configs, split.state_dicts)
        plan = plan_from_meta(meta, {name: split.state_dicts[name] for name in models})
    except (CheckpointKeyError, SafetensorsFormatError, ValueError, RuntimeError) as e:
        hint = ("set base_model_config to the diffusers config folder that matches this checkpoint"
                if not base_model_config else f"base_model_config {info.config_folder} does not match it")
        raise _load_error(f"base_model: {path} ({info.description}) does not fit the configs in "
                          f"{info.config_folder}: {e}; {hint}") from e
    del meta, split
    dtype = dtype or torch.float32
    _stream_into(models, index, plan, dtype, torch.device(device))
    parts = dict(models, scheduler_config=configs["scheduler"],
                 family=family_row(info.family, info.prediction_type),
                 source=str(path), source_hash=fingerprint_file(path), detected=info.summary(),
                 reload=_single_file_reloader(index, plan, dtype))
    parts.update(_tokenizers(info.config_folder, info.family))
    return parts


def load_folder(path: str | Path, dtype=None, device="cpu") -> dict:
    """Load a diffusers pipeline folder (SD1, SD2 or SDXL) into components, offline.

    Only .safetensors weights (a folder with .bin pickles only is refused); the UNet and text
    encoders in ``dtype`` (default float32), the VAE in float32, all on ``device``. The
    libraries build the models on the meta device and load the files directly in that dtype.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .diffusers_sd import _folder_fingerprint

    path = Path(path)
    info = _describe_folder(path)
    log.info("%s: %s", path.name, info.summary())
    _check_folder_weights(path, ["unet", "vae", *(name for name in _TEXT_ENCODERS if (path / name).is_dir())])
    dtype = dtype or torch.float32
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", torch_dtype=dtype, **kwargs),
            "vae": AutoencoderKL.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32, **kwargs),
        }
        configs = load_config_dicts(path)
        for name in _TEXT_ENCODERS:
            if name in configs:
                with_projection = any("WithProjection" in a for a in configs[name].get("architectures") or ())
                model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
                parts[name] = model_class.from_pretrained(str(path), subfolder=name, **_transformers_dtype(dtype), **kwargs)
    except OSError as e:
        raise _load_error(f"base_model: {path}: {e} (diffusers folders are loaded from .safetensors weights "
                          "only; .bin files are pickles, which this project never loads)") from e
    for model in parts.values():
        model.to(device)
        model.eval()
    parts.update(scheduler_config=configs["scheduler"], family=family_row(info.family, info.prediction_type),
                 source=str(path), source_hash=_folder_fingerprint(path), detected=info.summary(),
                 reload=_folder_reloader(path, {name: type(parts[name]) for name in parts}, dtype))
    parts.update(_tokenizers(path, info.family))
    return parts


def _single_file_reloader(index, plan: Mapping, dtype):
    """reload(component) -> its state dict (CPU, load dtype; the VAE float32) read again from the file:
    for a text encoder or VAE dropped from memory after caching (DiffusersBackbone.park)."""
    def reload(component: str) -> dict:
        import torch

        from .streaming import stream_tensors

        own = {key: kept for key, placements in plan.items()
               if (kept := [p for p in placements if p.component == component])}
        dtype_for = (lambda name: torch.float32 if name == "vae" else dtype)
        return {key: tensor for _, key, tensor in stream_tensors(index, own, dtype_for, torch.device("cpu"))}

    return reload


def _folder_reloader(path: Path, classes: Mapping, dtype):
    def reload(component: str) -> dict:
        import torch

        kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
        if component == "vae":
            kwargs["torch_dtype"] = torch.float32
        elif component.startswith("text_encoder"):
            kwargs.update(_transformers_dtype(dtype))
        return classes[component].from_pretrained(str(path), subfolder=component, **kwargs).state_dict()

    return reload


def _transformers_dtype(dtype) -> dict:
    """transformers 5 renamed ``torch_dtype`` to ``dtype`` (the WebUI's 4.x knows only the former)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def _empty_models(configs: Mapping, state_dicts: Mapping) -> dict:
    """The models built without allocating their weights (meta parameters; buffers stay real: a
    text encoder's position_ids are not in checkpoints), after checking that ``state_dicts`` (meta
    tensors are enough) fit them key for key and shape for shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        from accelerate import init_empty_weights
    except ImportError:   # without accelerate (a dependency of the diffusers extra): ordinary init
        init_empty_weights = contextlib.nullcontext
    models = {}
    for name in ("unet", "vae", *_TEXT_ENCODERS):
        if name not in configs or name not in state_dicts:
            continue
        with init_empty_weights():
            if name == "unet":
                model = UNet2DConditionModel.from_config(_public(configs["unet"]))
            elif name == "vae":
                model = AutoencoderKL.from_config(_public(configs["vae"]))
            else:
                model = build_text_encoder(configs[name])
        _check_fits(model, state_dicts[name], name)
        models[name] = model
    return models


def _check_fits(model, state_dict: Mapping, what: str) -> None:
    own = model.state_dict()
    # transformers keeps position_ids out of checkpoints (a non-persistent buffer in recent versions)
    missing = [k for k in own if k not in state_dict and not k.endswith("position_ids")]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the config"
             for k, v in state_dict.items() if tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{what}: {len(wrong)} shape mismatches, e.g. {wrong[0]}")


def _stream_into(models: Mapping, index, plan: Mapping, dtype, device) -> None:
    """Fill the empty models from the file, tensor by tensor, in their training dtype and device.
    The VAE stays float32 (it encodes once; fp16 VAEs overflow, SDXL's notably)."""
    import torch

    from .streaming import stream_tensors

    def dtype_for(component: str):
        return torch.float32 if component == "vae" else dtype

    tensors: dict = {name: {} for name in models}
    for component, key, tensor in stream_tensors(index, plan, dtype_for, device):
        tensors[component][key] = tensor
    for name, model in models.items():
        model.load_state_dict(tensors.pop(name), strict=False, assign=True)
        model.to(device)   # the real buffers (position_ids) follow the weights
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise _load_error(f"{name}: no weights for {on_meta[:3]}")
        model.eval()


def _tokenizers(folder: Path | None, family: str) -> dict:
    """tokenizer (+ tokenizer_2): the folder's files if it has them, else the built-in CLIP tokenizer
    with the family's padding (OpenCLIP encoders pad with "!", OpenAI CLIP with <|endoftext|>)."""
    kinds = FAMILIES[family].text_encoders
    names = ("tokenizer", "tokenizer_2")[:len(kinds)]
    return {name: _tokenizer(folder, name, OPEN_CLIP_PAD_TOKEN if kind == OPEN_CLIP else EOS_TOKEN)
            for name, kind in zip(names, kinds)}


def _tokenizer(folder: Path | None, subfolder: str, pad_token: str):
    from transformers import CLIPTokenizer

    if folder is not None:
        candidate = Path(folder) / subfolder
        if (candidate / "vocab.json").is_file() or (candidate / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(str(candidate), local_files_only=True)
    return build_tokenizer(pad_token)


def _public(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}
