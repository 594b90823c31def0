"""Headless backbone: an SD1 / SD2 / SDXL model held as diffusers modules.

Loading (loading.py) is fully offline: single-file checkpoints are converted with our own key map
(ldm_keys) into models built from shipped (or user-given) config files; nothing comes from a hub.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ..lora.targets import PROJECTION, RESNET, SAMPLER, TEXT, LoraTarget, transformer_block_role
from ..training.objective import alphas_cumprod_from_schedule
from .families import Family

log = logging.getLogger(__name__)



class ModelLoadError(RuntimeError):
    pass


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
    """SD1 / SD2 / SDXL over diffusers modules. SDXL differs by data: a second text encoder whose
    penultimate hidden states are concatenated, a pooled embedding, and per-sample size ids."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, family: Family,
                 source: str, source_hash: str, prediction_type: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder_2=None, tokenizer_2=None, detected: str = ""):
        self.unet, self.vae = unet, vae
        self.text_encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
        self.tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.family = family
        self.detected = detected
        self.source, self.source_hash = source, source_hash
        self.prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
        self.alphas_cumprod = alphas_cumprod_from_schedule(
            scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012),
            scheduler_config.get("num_train_timesteps", 1000),
            scheduler_config.get("beta_schedule", "scaled_linear"))
        self.scaling_factor = vae.config.get("scaling_factor", 0.18215)
        self.device = torch.device(device)
        self.dtype = dtype
        # SDXL's time ids (original size, crop, target size) are part of the conditioning
        self.conditioning_uses_sizes = family.name == "sdxl"
        for m in (unet, *self.text_encoders):
            m.to(self.device)
            if dtype != torch.float32:  # (passing an unchanged dtype makes diffusers warn)
                m.to(dtype=dtype)
        # the VAE stays fp32: it is only used for encoding (once) and fp16 VAEs overflow (SDXL's)
        vae.to(self.device)
        for m in (unet, vae, *self.text_encoders):
            m.eval()

    # identity / settings
    def identity(self) -> dict:
        return {"family": self.family.name, "source": self.source, "hash": self.source_hash,
                "prediction_type": self.prediction_type}

    def runtime_settings(self) -> dict:
        processors = sorted({type(p).__name__ for p in self.unet.attn_processors.values()})
        return {"attention": processors, "dtype": str(self.dtype), "device": self.device.type}

    def freeze(self) -> None:
        for m in (self.unet, self.vae, *self.text_encoders):
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

    def _token_ids(self, tokenizer, captions):
        return tokenizer(list(captions), padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, captions, sizes=None):
        if self.family.name != "sdxl":
            return {"crossattn": self.text_encoder(self._token_ids(self.tokenizer, captions))[0]}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])   # SDXL conditions on the penultimate layer
            pooled = out[0]                         # text_embeds of the projection model (te2)
        return {"crossattn": torch.cat(hidden, dim=-1), "text_embeds": pooled,
                "time_ids": self._time_ids(len(captions), sizes)}

    def _time_ids(self, count: int, sizes) -> torch.Tensor:
        if sizes is None or any(s is None for s in sizes):
            side = self.family.default_resolution
            sizes = [{"original": (side, side), "crop": (0, 0), "target": (side, side)}] * count
        ids = [[*s["original"], *s["crop"], *s["target"]] for s in sizes]
        return torch.tensor(ids, dtype=torch.float32, device=self.device)

    def predict(self, noisy_latents, timesteps, cond):
        extra = {}
        if self.family.name == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(self.dtype),
                                          "time_ids": cond["time_ids"].to(self.dtype)}
        return self.unet(noisy_latents.to(self.dtype), timesteps.to(self.device),
                         encoder_hidden_states=cond["crossattn"].to(self.dtype), **extra).sample

    @torch.no_grad()
    def decode_latents(self, latents):
        images = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    # LoRA targets
    def lora_targets(self) -> list[LoraTarget]:
        targets = [LoraTarget(self._unet_kohya_name(path), module, "unet", role)
                   for path, module in self.unet.named_modules() if (role := unet_role(path, module))]
        components = ("te",) if len(self.text_encoders) == 1 else ("te1", "te2")
        for component, prefix, encoder in zip(components, self.family.text_encoder_prefixes,
                                              self.text_encoders):
            for path, module in encoder.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in path:
                    # kohya names use the HF path with the `text_model.` level (newer transformers drop it)
                    hf_path = path if path.startswith("text_model.") else "text_model." + path
                    targets.append(LoraTarget(f"{prefix}_{hf_path.replace('.', '_')}", module, component, TEXT))
        return targets

    def _unet_kohya_name(self, path: str) -> str:
        """kohya's native naming: diffusers paths for SD1/SD2, SGM (LDM) paths for SDXL."""
        if self.family.name == "sdxl":
            from .ldm_keys import unet_ldm_module_name
            path = unet_ldm_module_name(path, self.unet.config)
        return "lora_unet_" + path.replace(".", "_")


def unet_role(path: str, module) -> str | None:
    """Role of a diffusers UNet layer (see lora.targets), or None if LoRA never targets it."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return None
    parts = path.split(".")
    leaf = parts[-1]
    if "transformer_blocks" in parts:
        return transformer_block_role(path)
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
    """SD1 / SD2 / SDXL from a diffusers folder or a WebUI-style single file (see loading.py)."""
    from .loading import load_folder, load_single_file

    path = Path(base_model)
    if path.is_dir():
        parts = load_folder(path, dtype=dtype, device=device)
    elif path.is_file():
        parts = load_single_file(path, base_model_config, dtype=dtype, device=device)
    else:
        raise ModelLoadError(f"base_model: {path} does not exist")
    return DiffusersBackbone(**parts, prediction_type=prediction_type, device=device, dtype=dtype)


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(fingerprint_file(f).encode())
    return h.hexdigest()[:16]
