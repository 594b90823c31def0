"""Headless backbone: a Stable Diffusion model loaded with diffusers from a folder or a single file.

Fully offline: single-file checkpoints are converted with our own key map (ldm_keys) into models
built from shipped (or user-given) config files; nothing is fetched from a model hub.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..lora.targets import (ATTENTION, FEED_FORWARD, PROJECTION, RESNET, SAMPLER, TEXT, LoraTarget)
from ..training.objective import alphas_cumprod_from_schedule
from .families import FAMILIES, Family

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class ModelLoadError(RuntimeError):
    pass


# ---- family detection -------------------------------------------------------------------------------

def detect_family(keys) -> str:
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError("cannot tell the model family: the checkpoint has no SD1 "
                         "(cond_stage_model.transformer.*), SD2 (cond_stage_model.model.*) or SDXL "
                         "(conditioner.embedders.*) text-encoder keys")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _config_folder_for(checkpoint: Path, family: str, base_model_config: str | None) -> Path:
    """Explicit base_model_config, else a `<checkpoint stem>.config/` folder next to the file (how the
    demo ships its tiny model, like the WebUI's `<stem>.yaml`), else the shipped family configs."""
    if base_model_config:
        return Path(base_model_config)
    sibling = checkpoint.with_suffix(".config")
    if (sibling / "unet" / "config.json").exists():
        return sibling
    folder = SHIPPED_CONFIGS / family
    if not folder.is_dir():
        raise ModelLoadError(f"no shipped configs for the '{family}' family yet; set base_model_config "
                             "to a diffusers-format config folder")
    return folder


def fingerprint_file(path: Path) -> str:
    """Cheap identity of a large checkpoint: size + sha256 of three 1 MiB windows. A full sha256 of a
    7 GB file costs a minute on every start; a changed model still changes these bytes."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in (0, size // 2, max(0, size - (1 << 20))):
            f.seek(offset)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


# ---- the backbone ------------------------------------------------------------------------------------

class DiffusersBackbone:
    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, family: Family,
                 source: str, source_hash: str, prediction_type: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.family = family
        self.source, self.source_hash = source, source_hash
        self.prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
        self.alphas_cumprod = alphas_cumprod_from_schedule(
            scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012),
            scheduler_config.get("num_train_timesteps", 1000),
            scheduler_config.get("beta_schedule", "scaled_linear"))
        self.scaling_factor = vae.config.get("scaling_factor", 0.18215)
        self.device = torch.device(device)
        self.dtype = dtype
        for m in (unet, text_encoder):
            m.to(self.device)
            if dtype != torch.float32:  # (passing an unchanged dtype makes diffusers warn)
                m.to(dtype=dtype)
        # the VAE stays fp32: it is only used for encoding (once) and fp16 VAEs overflow
        vae.to(self.device)
        for m in (unet, vae, text_encoder):
            m.eval()

    # identity / settings
    def identity(self) -> dict:
        return {"family": self.family.name, "source": self.source, "hash": self.source_hash,
                "prediction_type": self.prediction_type}

    def runtime_settings(self) -> dict:
        processors = sorted({type(p).__name__ for p in self.unet.attn_processors.values()})
        return {"attention": processors, "dtype": str(self.dtype), "device": self.device.type}

    def freeze(self) -> None:
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    # encoding / prediction
    @torch.no_grad()
    def encode_image(self, pixels, generator):
        dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(self.device)
        return (dist.mean + dist.std * noise) * self.scaling_factor

    def encode_text(self, captions, sizes=None):
        ids = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        hidden = self.text_encoder(ids.to(self.device))[0]
        return {"crossattn": hidden}

    def predict(self, noisy_latents, timesteps, cond):
        return self.unet(noisy_latents.to(self.dtype), timesteps.to(self.device),
                         encoder_hidden_states=cond["crossattn"].to(self.dtype)).sample

    @torch.no_grad()
    def decode_latents(self, latents):
        images = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    # LoRA targets
    def lora_targets(self) -> list[LoraTarget]:
        targets = [LoraTarget("lora_unet_" + path.replace(".", "_"), module, "unet", role)
                   for path, module in self.unet.named_modules() if (role := unet_role(path, module))]
        prefix = self.family.text_encoder_prefixes[0]
        for path, module in self.text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in path:
                # kohya names use the HF path with the `text_model.` level (newer transformers drop it)
                hf_path = path if path.startswith("text_model.") else "text_model." + path
                targets.append(LoraTarget(f"{prefix}_{hf_path.replace('.', '_')}", module, "te", TEXT))
        return targets


def unet_role(path: str, module) -> str | None:
    """Role of a diffusers UNet layer (see lora.targets), or None if LoRA never targets it."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return None
    parts = path.split(".")
    leaf = parts[-1]
    if "transformer_blocks" in parts:
        if leaf in ("to_q", "to_k", "to_v") or path.endswith("to_out.0"):
            return ATTENTION
        if path.endswith("ff.net.0.proj") or path.endswith("ff.net.2"):
            return FEED_FORWARD
        return None
    if "attentions" in parts and leaf in ("proj_in", "proj_out"):
        return PROJECTION
    if "resnets" in parts and leaf in ("conv1", "conv2", "conv_shortcut", "time_emb_proj"):
        return RESNET
    if ("downsamplers" in parts or "upsamplers" in parts) and leaf == "conv":
        return SAMPLER
    return None


# ---- loading -----------------------------------------------------------------------------------------

def load_backbone(base_model: str, base_model_config: str | None = None, device="cpu",
                  dtype=torch.float32, prediction_type: str | None = None) -> DiffusersBackbone:
    path = Path(base_model)
    if path.is_dir():
        parts = _load_folder(path)
    elif path.is_file():
        parts = _load_single_file(path, base_model_config)
    else:
        raise ModelLoadError(f"base_model: {path} does not exist")
    return DiffusersBackbone(**parts, prediction_type=prediction_type, device=device, dtype=dtype)


def _tokenizer_from(folder: Path):
    from transformers import CLIPTokenizer

    if (folder / "tokenizer" / "vocab.json").exists() or (folder / "tokenizer" / "tokenizer.json").exists():
        return CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    from .clip_tokenizer import build_clip_tokenizer
    return build_clip_tokenizer()


def _load_folder(path: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (path / "unet" / "config.json").exists():
        raise ModelLoadError(f"base_model: {path} is a folder but not a diffusers model "
                             "(no unet/config.json)")
    if (path / "text_encoder_2").exists():
        raise ModelLoadError(f"base_model: {path} looks like SDXL; SDXL is not supported in this version")
    kwargs = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", **kwargs)
    family = "sd2" if text_encoder.config.hidden_size == 1024 else "sd1"
    if family != "sd1":
        raise ModelLoadError(f"base_model: {path} looks like SD2; SD2 is not supported in this version")
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer_from(path),
                scheduler_config=scheduler, family=FAMILIES[family], source=str(path),
                source_hash=_folder_fingerprint(path))


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(fingerprint_file(f).encode())
    return h.hexdigest()[:16]


def _load_single_file(path: Path, base_model_config: str | None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .ldm_keys import ldm_to_diffusers

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"base_model: {path}: only .safetensors single files are loaded "
                             "(.ckpt files are pickles, which this project never loads)")
    state = load_file(str(path))
    family = detect_family(state.keys())
    if family != "sd1":
        raise ModelLoadError(f"base_model: {path} is {family.upper()}; only SD1 is supported in this version")
    folder = _config_folder_for(path, family, base_model_config)
    log.info("Detected family %s for %s (configs from %s)", family, path.name, folder)
    unet_config = _read_json(folder / "unet" / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json")))
    try:
        unet_sd, vae_sd, te_sd = ldm_to_diffusers(state, unet_config, vae_config)
        _load_strict(unet, unet_sd, "UNet")
        _load_strict(vae, vae_sd, "VAE")
        _load_strict(text_encoder, te_sd, "text encoder")
    except (KeyError, ValueError, RuntimeError) as e:
        hint = ("set base_model_config to the diffusers config folder that matches this checkpoint"
                if not base_model_config else f"base_model_config {folder} does not match it")
        raise ModelLoadError(f"base_model: {path} does not fit the {family} configs in {folder}: {e}; "
                             f"{hint}") from e
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer_from(folder),
                scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
                family=FAMILIES[family], source=str(path), source_hash=fingerprint_file(path))


def _load_strict(model, state_dict, what: str) -> None:
    own = model.state_dict()
    # transformers may keep non-persistent buffers (position_ids) out of checkpoints
    missing = [k for k in own if k not in state_dict and not k.endswith("position_ids")]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)} in the file, "
                             f"{tuple(own[k].shape)} in the config")
    model.load_state_dict(state_dict, strict=False)
