"""Predict a headless run's peak memory from its config, before loading anything (`doctor --config`).

peak = max(load, steps):
  load  = the runtime (interpreter + torch/diffusers imports) + every weight in its load dtype
          (UNet and text encoders in base_dtype, VAE fp32; the loader streams, so no second copy)
  steps = the runtime + the UNet + whatever is not parked after caching (text encoders, VAE; see
          free_text_encoders_after_caching / offload_vae_after_caching) + activations for the
          backward pass + the in-memory caches (latents, caption embeddings)

The parameter counts come from the checkpoint's header (shapes only). The activation term is
calibrated on the real-size benchmark (benchmarks/bench_realsize.py, CPU, batch 1, 512 px) and
scaled with batch x pixels; it is an estimate, printed as one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
RUNTIME_BYTES = int(0.7 * GIB)   # python + torch (CPU build) + diffusers/transformers, measured ~0.6-0.7 GiB
# what a training step adds over the loaded weights for one 512 px sample in fp32 (activations kept
# for the backward pass, autograd buffers), with / without gradient checkpointing. SD1 with
# checkpointing is measured (benchmarks/bench_realsize.py: +1.6 GiB); the others are scaled guesses
# (SDXL: a wider UNet; no checkpointing: ~2x, from the issue's +2.9 GiB dry run of SD1.5).
ACTIVATIONS_512 = {"sd1": (1.6 * GIB, 3.0 * GIB), "sd2": (1.6 * GIB, 3.0 * GIB), "sdxl": (2.4 * GIB, 5.0 * GIB)}
_PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
             "text_encoders": ("cond_stage_model.", "conditioner.")}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class MemoryPrediction:
    family: str
    load_bytes: int
    steps_bytes: int
    weights_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.load_bytes, self.steps_bytes)

    def describe(self) -> str:
        return (f"predicted peak {self.peak_bytes / GIB:.1f} GiB (load {self.load_bytes / GIB:.1f} GiB, "
                f"training steps {self.steps_bytes / GIB:.1f} GiB; weights {self.weights_bytes / GIB:.1f} GiB "
                "in their training dtype)")


def parameter_counts(base_model: str) -> dict[str, int]:
    """unet / vae / text_encoders parameter counts of a single file (header only) or a diffusers folder."""
    path = Path(base_model)
    counts = {"unet": 0, "vae": 0, "text_encoders": 0}
    if path.is_dir():
        from ..backbones.streaming import read_index

        for part, key in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text_encoders"),
                          ("text_encoder_2", "text_encoders")):
            for file in sorted((path / part).glob("*.safetensors")):
                counts[key] += sum(_numel(e.shape) for e in read_index(file).entries.values())
        return counts
    from ..backbones.streaming import read_index

    for key, entry in read_index(path).entries.items():
        for part, prefixes in _PREFIXES.items():
            if key.startswith(prefixes):
                counts[part] += _numel(entry.shape)
                break
    return counts


def _numel(shape) -> int:
    n = 1
    for side in shape:
        n *= side
    return n


def predict_memory(cfg, family: str, dtype_name: str, device_type: str = "cpu") -> MemoryPrediction:
    """The prediction for ``cfg`` with the base weights in ``dtype_name`` ("fp32"/"fp16"/"bf16").
    On CUDA the figures are the GPU's (weights + activations; no Python runtime)."""
    counts = parameter_counts(cfg.base_model)
    size = _DTYPE_BYTES[dtype_name]
    unet, text, vae = counts["unet"] * size, counts["text_encoders"] * size, counts["vae"] * 4
    runtime = RUNTIME_BYTES if device_type == "cpu" else 0
    with_ckpt, without = ACTIVATIONS_512.get(family, ACTIVATIONS_512["sd1"])
    per_sample = with_ckpt if cfg.gradient_checkpointing else without
    if dtype_name != "fp32" or cfg.mixed_precision != "no":
        per_sample = int(per_sample * 0.8)   # measured (SD1.5, bf16 autocast on CPU): +1.34 vs +1.69 GiB
    activations = int(per_sample * cfg.batch_size * (cfg.resolution / 512) ** 2)
    caches = _cache_bytes(cfg, family)
    caches_cover_text = not cfg.train_text_encoder and not cfg.shuffle_caption and not cfg.random_crop
    kept = unet
    kept += 0 if cfg.free_text_encoders_after_caching and caches_cover_text else text
    kept += 0 if cfg.offload_vae_after_caching and not cfg.random_crop else vae
    return MemoryPrediction(family, runtime + unet + text + vae, runtime + kept + activations + caches,
                            unet + text + vae)


def _cache_bytes(cfg, family: str) -> int:
    """In-memory latents and caption embeddings of the dataset (small next to the model)."""
    from .session import index_dataset

    try:
        images = index_dataset(cfg).num_images
    except Exception:   # the data check reports data problems itself
        return 0
    latent = 4 * 4 * (cfg.resolution // 8) ** 2
    text = 77 * (2048 if family == "sdxl" else 1024) * 4
    return images * (latent + text)
