"""The Backbone protocol over the model Forge has loaded (SD1, SDXL).

The WebUI backbone does the layer naming, identity, freezing and gradient checkpointing on a view
of Forge's modules under A1111's attribute paths (`forge.model_view`, `forge.forge_layout`); this
class replaces only the calls into the model, which go through Forge's own objects:

- text: Forge's `get_learned_conditioning` (its prompt parser, emphasis, embeddings, CLIP skip; for
  SDXL the pooled output and the size embedding) on the CLIP patcher the memory manager has loaded,
  called without the `inference_mode` Forge wraps it in, so text-encoder LoRA layers get gradients;
- images: `encode_first_stage` / `decode_first_stage` (Forge's VAE patcher; no gradient needed),
  their inference-mode results cloned into ordinary tensors;
- the UNet: `diffusion_model(x, t, context=c, y=vector)` directly, as the training objective needs
  the raw epsilon / v prediction (Forge's `apply_model` works in k-diffusion's sigma space), in
  Forge's computation dtype.
"""
from __future__ import annotations

import logging

import torch

from .backbone import WebuiBackbone
from .forge import AutogradWeights, clean_forge_weights, forge_layout, forge_parts, model_view
from .names import family_of

log = logging.getLogger("lora_trainer")

_BLOCK_NORMS = ("norm1", "norm2", "norm3", "norm_in")


class _CopyInput:
    """Instance `forward` that hands the layer a copy of its input while autograd records."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)


class ForgeBackbone(WebuiBackbone):
    def __init__(self, sd_model, env=None, resolution: int = 512, memory_management=None):
        self.forge_model = sd_model
        self.memory_management = memory_management
        super().__init__(model_view(sd_model), env=env, resolution=resolution)
        unet, _, _ = forge_parts(sd_model)
        self.compute_dtype = getattr(unet.model, "computation_dtype", self.dtype)
        self.autograd = AutogradWeights(self.model)   # entered by the job around training
        self._norms: list = []

    reports_webui_lookup = False   # A1111's lookup; Forge's loader maps kohya's lora_te1_/lora_te2_ keys itself
    blocks_modify_their_input = True   # Forge's transformer blocks: `x += attn1(norm1(x))`

    @staticmethod
    def layout_of(view):
        return forge_layout(family_of(view))

    def freeze(self) -> None:
        super().freeze()
        self._copy_norm_inputs(True)   # the trainer freezes first, inside the job's ModelGuard

    def _copy_norm_inputs(self, enabled: bool) -> None:
        """Forge's transformer blocks add the attention output into `x` in place (`x += n`) after
        `norm1(x)` / `norm2(x)` saved `x` for backward, which autograd refuses. Each norm of a
        transformer block gets a copy of its input instead (instance `forward`, removed again by
        `release`)."""
        if enabled and not self._norms:
            for path, module in self.unet.named_modules():
                if ".transformer_blocks." in f".{path}" and path.rsplit(".", 1)[-1] in _BLOCK_NORMS \
                        and "forward" not in module.__dict__:
                    module.forward = _CopyInput(module.forward)
                    self._norms.append(module)
        elif not enabled:
            for module in self._norms:
                if isinstance(module.__dict__.get("forward"), _CopyInput):
                    del module.__dict__["forward"]
            self._norms.clear()

    def release(self) -> None:
        super().release()
        self._copy_norm_inputs(False)

    def settle(self) -> None:
        """Let Forge finish what it does lazily at its first text encoding: it converts CLIP's
        token and position embeddings to fp32 then (`encode_with_transformers`). Done once before
        the job records the weights digest, as a generation would, so the digest is of the model
        as Forge runs it."""
        with torch.inference_mode():
            self.encode_text([""])

    def restore_after_generation(self) -> None:
        """After a preview through Forge's txt2img: its LoRA patches off again, and the weights
        they replaced (inference tensors) made usable by autograd again."""
        log.debug("%s", clean_forge_weights(self.forge_model, self.memory_management).summary())
        self.autograd.refresh()

    def _load(self, *patchers) -> None:
        """Have Forge's memory manager put these parts where it computes (as its processing does)."""
        memory_management = self.memory_management
        if memory_management is None:
            from backend import memory_management as forge_memory_management
            memory_management = forge_memory_management
        memory_management.load_models_gpu(list(patchers))

    def identity(self):
        identity = super().identity()
        identity["host"] = "forge"
        return identity

    def runtime_settings(self):
        settings = super().runtime_settings()
        settings.update(host="forge", attention="forge default", computation_dtype=str(self.compute_dtype))
        return settings

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _, _, vae = forge_parts(self.forge_model)
        with torch.no_grad(), self._rng_from(generator):
            latents = self.forge_model.encode_first_stage(pixels.to(self.device))
        return latents.float().clone()

    def encode_text(self, captions, sizes=None):
        set_clip_skip = getattr(self.forge_model, "set_clip_skip", None)
        if set_clip_skip is not None:   # what Forge's processing sets before every generation
            set_clip_skip(self._clip_skip())
        return super().encode_text(captions, sizes)   # through the view's forge_conditioning

    def predict(self, noisy_latents, timesteps, cond) -> torch.Tensor:
        unet, _, _ = forge_parts(self.forge_model)
        self._load(unet)
        dtype = self.compute_dtype
        x = noisy_latents.to(self.device, dtype)
        t = timesteps.to(self.device).float()
        c = cond["crossattn"].to(self.device, dtype)
        y = cond["vector"].to(self.device, dtype) if "vector" in cond else None   # SDXL: pooled text + sizes
        with self._half_precision_autocast():
            return self.unet(x, t, context=c, y=y).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.forge_model.decode_first_stage(latents.to(self.device))
        return (images.float().clone() / 2 + 0.5).clamp(0, 1)
