"""What the training loop, the samples, previews, cards and monitors read from a model: the whole
contract a new backbone is written against.

Implementations: `backbones.diffusers_sd.DiffusersBackbone` (headless, loads a model from disk) and
`webui.backbone.WebUIBackbone` (wraps the model the WebUI already has loaded). The loop imports
neither diffusers, gradio nor the WebUI: only this module.

Members with a value below are optional: an implementation that subclasses the protocol inherits
the default; every other member is required. Nothing outside a backbone probes a backbone with
`getattr`/`hasattr`: a member the core needs is declared here first.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..diffusion.families import Family
from ..lora.targets import LoraTarget

# Text conditioning is a dict so SD1/SD2 ({"crossattn"}) and SDXL ({"crossattn", "vector"}) share one
# code path; every tensor in it has the batch as its first dimension.
Conditioning = dict[str, torch.Tensor]

# SDXL's per-sample size conditioning: {"original": (h, w), "crop": (top, left), "target": (h, w)}
SizeInfo = dict[str, tuple[int, int]]


class Backbone(Protocol):
    """What any model the loop puts LoRA adapters on provides, whatever the task."""

    device: torch.device              # where the base weights (and so the LoRA) live
    dtype: torch.dtype                # dtype of the frozen base weights
    # optional: what the model was recognised as and why ("SDXL (from the UNet's add_embedding)"),
    # said once at the start of a run; empty when there is nothing to explain
    detected: str = ""

    def identity(self) -> dict[str, Any]:
        """A fingerprint of the base model (name, hash, family) for resume and cache checks."""
        ...

    def lora_targets(self) -> list[LoraTarget]:
        """Every LoRA-able layer, each with its kohya name, in a fixed order."""
        ...

    def freeze(self) -> None:
        """requires_grad_(False) on every base weight."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        ...

    def runtime_settings(self) -> dict[str, Any]:
        """Settings that change floating-point results (attention implementation…): stored in
        checkpoints so a resume can use (or warn about) the same ones."""
        ...


class DiffusionBackbone(Backbone, Protocol):
    """A Stable Diffusion model (SD1 / SD2 / SDXL): what the SD loop, previews and cards read."""

    family: Family                    # the family's row in diffusion/families.py
    prediction_type: str              # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor      # [num_train_timesteps], float64 or float32, on CPU
    # optional: True when `encode_text` needs each sample's sizes (SDXL's `vector`), so the samples
    # pass them and cache conditioning per (caption, sizes) instead of per caption
    conditioning_uses_sizes: bool = False
    # optional: encode images in VAE tiles of this many pixels (0: whole images); set by backbones
    # that can tile, for the memory-lean caching pass
    vae_tile_size: int = 0

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/8,W/8] (sampled with `generator`)."""
        ...

    def encode_text(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> Conditioning:
        """Captions -> conditioning. `sizes` carries SDXL's original/crop/target sizes per sample."""
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (epsilon or v, per `prediction_type`)."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] in [0,1] (previews)."""
        ...

    def compile_training_step(self, backend: str = "inductor") -> None:
        """Run `predict` through torch.compile while gradients are on (config `compile: true`);
        previews and everything else under no_grad keep the eager model. Optional: the default
        refuses, naming the field, for hosts whose model must not be compiled."""
        raise ValueError(f"compile: true is not available with {type(self).__name__}; set compile: false")
