"""A small txt2img sampler over the Backbone protocol (no diffusers scheduler, no WebUI).

Samplers: "euler" and "euler_a" (k-diffusion style, in sigma space, timesteps spaced evenly over the
training schedule) and "ddim" (eta 0). Classifier-free guidance mixes the conditional and the
negative prediction in one batched UNet call. All noise comes from one torch.Generator seeded per
image, created on the CPU so a seed gives the same image on any device; torch's global RNG is never
used, so a preview cannot shift the training's random draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..contracts.backbone import Conditioning, DiffusionBackbone
from .prompt_syntax import PreviewPrompt

# SD1/SD2/SDXL all have 4 latent channels and a VAE that downsamples by 8.
LATENT_CHANNELS = 4
VAE_FACTOR = 8
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM"}   # WebUI infotext names


@dataclass(frozen=True)
class SampleSettings:
    steps: int
    cfg_scale: float
    width: int
    height: int
    seed: int
    sampler: str

    @classmethod
    def for_prompt(cls, cfg, prompt: PreviewPrompt) -> SampleSettings:
        """A prompt line's own options (--w, --h, --s, --d, --l, sampler) over the config's preview
        settings. The one rule for our sampler and the WebUI's txt2img alike."""
        # the VAE works in blocks of 8 pixels: other sizes are rounded down (as kohya does)
        return cls(
            steps=prompt.steps or cfg.preview_steps,
            cfg_scale=cfg.preview_cfg_scale if prompt.cfg_scale is None else prompt.cfg_scale,
            width=(prompt.width or cfg.preview_width or cfg.resolution) // 8 * 8,
            height=(prompt.height or cfg.preview_height or cfg.resolution) // 8 * 8,
            seed=cfg.preview_seed if prompt.seed is None else prompt.seed,
            sampler=prompt.sampler or cfg.preview_sampler)


def negative_prompt_for(cfg, prompt: PreviewPrompt) -> str:
    return cfg.preview_negative_prompt if prompt.negative is None else prompt.negative


def concat_conditioning(first: dict, second: dict) -> dict:
    return {key: torch.cat([first[key], second[key]]) for key in first}


class GuidedDenoiser:
    """x0 predictions of the backbone at a noise level, with classifier-free guidance."""

    def __init__(self, backbone: DiffusionBackbone, cond: Conditioning, uncond: Conditioning | None,
                 cfg_scale: float):
        self.backbone = backbone
        self.cfg_scale = cfg_scale
        self.guided, self.cond = False, cond
        if uncond is not None and cfg_scale != 1.0:
            self.guided, self.cond = True, concat_conditioning(cond, uncond)

    def prediction(self, x_in: torch.Tensor, t: float) -> torch.Tensor:
        batch = torch.cat([x_in, x_in]) if self.guided else x_in
        timesteps = torch.full((batch.shape[0],), float(t), device=x_in.device)
        out = self.backbone.predict(batch, timesteps, self.cond).float()
        if not self.guided:
            return out
        cond_out, uncond_out = out.chunk(2)
        return uncond_out + self.cfg_scale * (cond_out - uncond_out)

    def x0(self, x_in: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
        """`x_in` = sqrt(alpha) x0 + sqrt(1 - alpha) noise; returns the predicted x0."""
        out = self.prediction(x_in, t)
        if self.backbone.prediction_type == "v_prediction":
            return math.sqrt(alpha) * x_in - math.sqrt(1 - alpha) * out
        return (x_in - math.sqrt(1 - alpha) * out) / math.sqrt(alpha)


def _randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


# ---- Euler (sigma space) ------------------------------------------------------------------------------

def sigma_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - acp) / acp) at (fractional) timesteps, interpolated in log space between
    integer timesteps as k-diffusion does."""
    acp = alphas_cumprod.double().cpu()
    log_sigmas = ((1 - acp) / acp).sqrt().log()
    timesteps = timesteps.double()
    low = timesteps.floor().long().clamp(0, len(acp) - 1)
    high = (low + 1).clamp(max=len(acp) - 1)
    frac = timesteps - low
    return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp()


def euler_schedule(alphas_cumprod: torch.Tensor, steps: int) -> tuple[list[float], list[float]]:
    """(timesteps spaced evenly from the last training step to 0, their sigmas + a final 0)."""
    timesteps = torch.linspace(len(alphas_cumprod) - 1, 0, steps, dtype=torch.float64)
    return timesteps.tolist(), sigma_at(alphas_cumprod, timesteps).tolist() + [0.0]


def _ancestral_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (eta 1)."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def sample_euler(denoiser: GuidedDenoiser, noise: torch.Tensor, steps: int,
                 generator: torch.Generator, ancestral: bool = False) -> torch.Tensor:
    timesteps, sigmas = euler_schedule(denoiser.backbone.alphas_cumprod, steps)
    x = noise * sigmas[0]
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha = 1.0 / (1.0 + sigma ** 2)
        x0 = denoiser.x0(x * math.sqrt(alpha), t, alpha)
        derivative = (x - x0) / sigma
        if ancestral:
            sigma_down, sigma_up = _ancestral_split(sigma, sigma_next)
            x = x + derivative * (sigma_down - sigma)
            if sigma_up:
                x = x + _randn(x.shape, generator, x.device) * sigma_up
        else:
            x = x + derivative * (sigma_next - sigma)
    return x


# ---- DDIM ------------------------------------------------------------------------------------------

def sample_ddim(denoiser: GuidedDenoiser, noise: torch.Tensor, steps: int) -> torch.Tensor:
    acp = denoiser.backbone.alphas_cumprod.double().cpu()
    timesteps = torch.linspace(len(acp) - 1, 0, steps).round().long().tolist()
    x = noise
    for i, t in enumerate(timesteps):
        alpha = float(acp[t])
        alpha_prev = float(acp[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x0 = denoiser.x0(x, t, alpha)
        eps = (x - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha)
        x = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * eps
    return x


# ---- entry point -----------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(backbone: DiffusionBackbone, cond: Conditioning, uncond: Conditioning | None,
                   settings: SampleSettings) -> torch.Tensor:
    """Latents [1, 4, H/8, W/8] (float32) for one image."""
    if settings.sampler not in SAMPLER_LABELS:
        raise ValueError(f"unknown preview sampler '{settings.sampler}' "
                         f"(one of {', '.join(SAMPLER_LABELS)})")
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    shape = (1, LATENT_CHANNELS, settings.height // VAE_FACTOR, settings.width // VAE_FACTOR)
    noise = _randn(shape, generator, backbone.device)
    denoiser = GuidedDenoiser(backbone, cond, uncond, settings.cfg_scale)
    if settings.sampler == "ddim":
        return sample_ddim(denoiser, noise, settings.steps)
    return sample_euler(denoiser, noise, settings.steps, generator,
                        ancestral=settings.sampler == "euler_a")


@torch.no_grad()
def render_image(backbone: DiffusionBackbone, cond: Conditioning, uncond: Conditioning | None,
                 settings: SampleSettings) -> torch.Tensor:
    """Decoded image [3, H, W] in [0, 1] on the CPU."""
    latents = sample_latents(backbone, cond, uncond, settings)
    return backbone.decode_latents(latents)[0].float().cpu()
