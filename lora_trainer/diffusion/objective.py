"""The diffusion training objective: noise schedule, noising, targets, loss weighting."""
from __future__ import annotations

import torch


def alphas_cumprod_from_schedule(beta_start: float, beta_end: float, num_train_timesteps: int,
                                 beta_schedule: str = "scaled_linear") -> torch.Tensor:
    # float32 like diffusers' DDPMScheduler, so our noising matches the reference pipelines bit for bit
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"unsupported beta_schedule '{beta_schedule}' (scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def add_noise(latents, noise, timesteps, alphas_cumprod):
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target_for(prediction_type: str, latents, noise, timesteps, alphas_cumprod):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight = min(SNR, gamma) / SNR for epsilon,
    / (SNR + 1) for v-prediction."""
    a = alphas_cumprod.to(torch.float64)[timesteps.cpu()]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return weights.to(torch.float32)


def per_sample_loss(prediction, target) -> torch.Tensor:
    """MSE per sample (mean over channels and pixels), in float32 whatever the compute dtype."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
