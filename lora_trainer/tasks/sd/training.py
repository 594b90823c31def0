"""The SD task inside the loop: aspect-ratio buckets, latents + caption embeddings, the
noise/timestep objective (epsilon or v, min-SNR) and the kohya LoRA file."""
from __future__ import annotations

import logging
from pathlib import Path

from ...data.buckets import BucketPlan, BucketSpec
from ...lora.kohya_file import load_into_network, network_tensors, read_lora_file, save_lora_file
from ...lora.targets import select_targets
from ...training.lora_metadata import lora_metadata
from ...diffusion.objective import add_noise, min_snr_weights, per_sample_loss, target_for
from ...training.memory import parkable_components
from ...training.outputs import RUN_ID_KEY
from ...training.samples import SampleSource

log = logging.getLogger("lora_trainer")


class SDTraining:
    data_unit = "images"
    def __init__(self, cfg, backbone, index):
        self.cfg, self.backbone, self.index = cfg, backbone, index
        self.output_path = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
        self.buckets = BucketPlan.for_index(index, BucketSpec.from_config(cfg), cfg.enable_bucket)
        self.samples = SampleSource(cfg, index, backbone, self.buckets)
        if hasattr(backbone, "vae_tile_size"):   # (the WebUI's backbone encodes its own way)
            backbone.vae_tile_size = cfg.vae_tile_size
        if cfg.compile:
            backbone.compile_training_step(cfg.compile_backend)

    def batch_keys(self):
        return self.buckets.per_record

    def lora_targets(self, preset: str):
        return select_targets(self.backbone.lora_targets(), preset, self.cfg.train_text_encoder)

    def init_network(self, network, say) -> None:
        if self.cfg.init_lora_from:
            tensors, _ = read_lora_file(self.cfg.init_lora_from)
            load_into_network(network, tensors, self.cfg.init_lora_from)
            say(f"Initialised the LoRA from {self.cfg.init_lora_from}")

    def prepare(self) -> None:
        self.samples.precompute_latents()
        self.samples.precompute_conditioning()

    def release_cached_inputs(self) -> list[str]:
        """Text encoders / VAE out of memory once their outputs are cached (config levers; the
        backbone reads them back when a preview needs them). Returns what left memory."""
        names = parkable_components(self.cfg, self.samples, self.backbone)
        return self.backbone.park(names) if names else []

    def loss(self, epoch, chunk, autocast):
        latents, captions, noise, timesteps, sizes = self.samples.batch(epoch, chunk)
        device = self.backbone.device
        latents, noise = latents.to(device), noise.to(device)
        acp = self.backbone.alphas_cumprod
        with autocast():
            cond = self.samples.conditioning(captions, sizes)
            noisy = add_noise(latents, noise, timesteps, acp)
            prediction = self.backbone.predict(noisy, timesteps, cond)
        target = target_for(self.backbone.prediction_type, latents, noise, timesteps, acp)
        losses = per_sample_loss(prediction, target)
        if self.cfg.min_snr_gamma:
            losses = losses * min_snr_weights(timesteps, acp, self.cfg.min_snr_gamma,
                                              self.backbone.prediction_type).to(losses.device)
        return losses.mean()

    def export(self, trainer, path: Path) -> None:
        # the run id tells this run's own files from anyone else's (training/outputs.py)
        metadata = {**lora_metadata(trainer, output_name=path.stem), RUN_ID_KEY: trainer.run_id}
        save_lora_file(path, network_tensors(trainer.network, self.cfg.save_precision), metadata)

    def snapshot_path(self, step: int) -> Path:
        return self.output_path.with_name(f"{self.cfg.output_name}-{step:06d}.safetensors")

    def describe(self, say, warn) -> None:
        detected = self.backbone.detected
        if detected:  # which family/variant the checkpoint was recognised as, and why
            say(f"Base model: {detected}")
        say(f"Buckets (width x height: samples): {self.buckets.describe(self.index)}")
        upscaled = self.buckets.upscaled(self.index, self.cfg.max_upscale_factor)
        if upscaled:
            names = ", ".join(f"{name} (x{factor:.1f})" for name, factor in upscaled[:10])
            warn(f"{len(upscaled)} images are enlarged more than max_upscale_factor "
                 f"{self.cfg.max_upscale_factor:.1f} to fill their bucket and will look soft: {names}"
                 + (" ..." if len(upscaled) > 10 else ""))
        for note in self.samples.cache_notes():
            say(note)

    def finish_hint(self) -> str:
        return f"use it as <lora:{self.cfg.output_name}:0.7>"

    def size_lever(self) -> str:
        return f"lower resolution (now {self.cfg.resolution})"
