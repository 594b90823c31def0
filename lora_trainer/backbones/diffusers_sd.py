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
from ..contracts.backbone import DiffusionBackbone
from ..diffusion.objective import alphas_cumprod_from_schedule
from ..diffusion.families import LDM_NAMES, Family

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

class DiffusersBackbone(DiffusionBackbone):
    """SD1 / SD2 / SDXL over diffusers modules. SDXL differs by data: a second text encoder whose
    penultimate hidden states are concatenated, a pooled embedding, and per-sample size ids."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, family: Family,
                 source: str, source_hash: str, prediction_type: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder_2=None, tokenizer_2=None, detected: str = "", reload=None):
        self.unet, self.vae = unet, vae
        # reload(component) -> that component's state dict from base_model, in its load dtype
        # (None: components can only be moved, never dropped)
        self._reload = reload
        self._parked: dict = {}   # component name -> "dropped" | "cpu"
        self._training_unet = None   # compile_training_step: the compiled callable over self.unet
        self.vae_tile_size = 0
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
        self.scaling_factor = vae.config.get("scaling_factor", family.latent_scale)
        self.device = torch.device(device)
        self.dtype = dtype
        # SDXL's time ids (original size, crop, target size) are part of the conditioning
        self.conditioning_uses_sizes = family.conditioning_uses_sizes
        for m in (unet, *self.text_encoders):
            m.to(self.device)
            # the loader already gave them this dtype; casting anyway makes diffusers warn
            if any(p.dtype != dtype for p in m.parameters() if p.is_floating_point()):
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

    # memory levers: components out of memory while they are not needed ---------------------------
    def _components(self) -> dict:
        named = {"vae": self.vae, "text_encoder": self.text_encoder}
        if len(self.text_encoders) > 1:
            named["text_encoder_2"] = self.text_encoders[1]
        return named

    def park(self, names) -> list[str]:
        """Take components out of memory until they are used again (``unpark`` or their first use
        in encode_image / encode_text / decode_latents). On a GPU they move to the CPU; on the CPU
        their weights are dropped and read back from base_model later (needs ``reload``). The
        module objects stay (hooks and LoRA adapters on them stay valid). Returns what it parked."""
        parked = []
        for name in names:
            module = self._components().get(name)
            if module is None or name in self._parked:
                continue
            if self.device.type != "cpu":
                module.to("cpu")
                self._parked[name] = "cpu"
            elif self._reload is not None:
                for param in module.parameters():   # keeps the Parameter objects, frees their data
                    param.data = torch.empty(0, dtype=param.dtype)
                self._parked[name] = "dropped"
            else:
                continue
            parked.append(name)
        if parked:
            from .memory import release_free_memory

            release_free_memory()
        return parked

    def unpark(self, names=None) -> None:
        for name in list(self._parked if names is None else names):
            how = self._parked.pop(name, None)
            if how is None:
                continue
            module = self._components()[name]
            if how == "dropped":
                state = self._reload(name)
                for key, param in module.named_parameters():
                    param.data = state.pop(key)
                del state
            module.to(self.device)

    @property
    def parked(self) -> tuple[str, ...]:
        return tuple(self._parked)

    def _vae_encode(self, pixels):
        """Tiles above vae_tile_size px per side (diffusers' tiled encode, tiles of that size)."""
        tile = self.vae_tile_size
        use_tiling = bool(tile) and max(pixels.shape[-2:]) > tile and hasattr(self.vae, "tile_sample_min_size")
        if not use_tiling:
            return self.vae.encode(pixels)
        saved = (self.vae.use_tiling, self.vae.tile_sample_min_size, self.vae.tile_latent_min_size)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae.use_tiling, self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = True, tile, tile // factor
        try:
            return self.vae.encode(pixels)
        finally:
            self.vae.use_tiling, self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = saved

    # encoding / prediction
    @torch.no_grad()
    def encode_image(self, pixels, generator):
        self.unpark(["vae"])
        dist = self._vae_encode(pixels.to(self.device, torch.float32)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(self.device)
        return (dist.mean + dist.std * noise) * self.scaling_factor

    def _token_ids(self, tokenizer, captions):
        return tokenizer(list(captions), padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, captions, sizes=None):
        self.unpark([n for n in self._parked if n.startswith("text_encoder")])
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

    def compile_training_step(self, backend: str = "inductor") -> None:
        from .compiled import compiled_for_training
        self._training_unet = compiled_for_training(self.unet, self.device, backend)

    def predict(self, noisy_latents, timesteps, cond):
        # the compiled graph is the training step's; previews (no_grad) stay eager
        unet = self._training_unet if self._training_unet is not None and torch.is_grad_enabled() else self.unet
        extra = {}
        if self.family.name == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(self.dtype),
                                          "time_ids": cond["time_ids"].to(self.dtype)}
        return unet(noisy_latents.to(self.dtype), timesteps.to(self.device),
                    encoder_hidden_states=cond["crossattn"].to(self.dtype), **extra).sample

    @torch.no_grad()
    def decode_latents(self, latents):
        self.unpark(["vae"])
        images = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    # LoRA targets
    def lora_targets(self) -> list[LoraTarget]:
        targets = [LoraTarget(self._unet_kohya_name(path), module, "unet", role)
                   for path, module in self.unet.named_modules() if (role := unet_role(path, module))]
        for component, prefix, encoder in zip(self.family.text_encoder_components,
                                              self.family.text_encoder_prefixes, self.text_encoders):
            for path, module in encoder.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in path:
                    # kohya names use the HF path with the `text_model.` level (newer transformers drop it)
                    hf_path = path if path.startswith("text_model.") else "text_model." + path
                    targets.append(LoraTarget(f"{prefix}_{hf_path.replace('.', '_')}", module, component, TEXT))
        return targets

    def _unet_kohya_name(self, path: str) -> str:
        """kohya's native naming: diffusers paths for SD1/SD2, SGM (LDM) paths for SDXL."""
        if self.family.unet_naming == LDM_NAMES:
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
