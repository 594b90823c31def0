"""The small surface the training loop needs from a diffusion model.

Two implementations: `diffusers_sd.DiffusersBackbone` (headless, loads a model from disk) and the
WebUI backbone (wraps the model the WebUI already has loaded). The loop imports neither diffusers,
gradio nor the WebUI: only this protocol.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..lora.targets import LoraTarget
from .families import Family

# Text conditioning is a dict so SD1/SD2 ({"crossattn"}) and SDXL ({"crossattn", "vector"}) share one
# code path; every tensor in it has the batch as its first dimension.
Conditioning = dict[str, torch.Tensor]


class Backbone(Protocol):
    family: Family
    prediction_type: str              # "epsilon" | "v_prediction"
    device: torch.device
    dtype: torch.dtype                # dtype of the frozen base weights
    alphas_cumprod: torch.Tensor      # [num_train_timesteps], float64 or float32, on CPU

    def identity(self) -> dict[str, Any]:
        """A fingerprint of the base model (name, hash, family) for resume and cache checks."""

    def lora_targets(self) -> list[LoraTarget]:
        """Every LoRA-able layer, each with its kohya name, in a fixed order."""

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/8,W/8] (sampled with `generator`)."""

    def encode_text(self, captions: list[str], sizes: list[dict] | None = None) -> Conditioning:
        """Captions -> conditioning. `sizes` carries SDXL's original/crop/target sizes per sample."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (epsilon or v, per `prediction_type`)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] in [0,1] (previews)."""

    def freeze(self) -> None:
        """requires_grad_(False) on every base weight."""

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...

    def runtime_settings(self) -> dict[str, Any]:
        """Settings that change floating-point results (attention implementation…): stored in
        checkpoints so a resume can use (or warn about) the same ones."""
