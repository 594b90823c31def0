"""Turning a (position in epoch, record) pair into training inputs, reproducibly.

Every random choice for a sample (crop, caption shuffle/dropout, noise, timestep) comes from an RNG
seeded by (seed, epoch, position) alone. So the draws do not depend on batch size, on how many
steps ran in this process, on previews, or on an out-of-memory retry at a smaller micro-batch: a
resumed run and an uninterrupted one see identical inputs.
"""
from __future__ import annotations

import random

import torch

from ..data.captions import process_caption
from ..data.images import load_rgb, resize_and_crop, to_tensor
from ..data.order import sample_rng


class SampleSource:
    def __init__(self, cfg, index, backbone):
        self.cfg = cfg
        self.records = index.records
        self.backbone = backbone
        self._latents: dict[int, torch.Tensor] = {}
        self._conds: dict[str, dict] = {}
        # With a random crop each epoch sees other pixels, so latents cannot be cached.
        self.cache_latents = not cfg.random_crop
        self.cache_text = not cfg.train_text_encoder

    # ---- latents -----------------------------------------------------------------------------------
    def _encode_record(self, record_idx: int, rng: random.Random | None) -> torch.Tensor:
        record = self.records[record_idx]
        img = load_rgb(record.path)
        size = self.cfg.resolution
        crop = "random" if self.cfg.random_crop else "center"
        img, _, _ = resize_and_crop(img, size, size, crop=crop, rng=rng)
        seed = rng.getrandbits(63) if rng is not None else (self.cfg.seed * 1_000_003 + record_idx)
        generator = torch.Generator().manual_seed(seed)
        # one image at a time: the result must not depend on which images share a batch
        return self.backbone.encode_image(to_tensor(img).unsqueeze(0), generator)[0].cpu()

    def precompute_latents(self, progress=None) -> None:
        if not self.cache_latents:
            return
        for i in range(len(self.records)):
            if i not in self._latents:
                self._latents[i] = self._encode_record(i, None)
            if progress:
                progress(i + 1, len(self.records))

    def latent(self, record_idx: int, rng: random.Random) -> torch.Tensor:
        if self.cache_latents:
            if record_idx not in self._latents:
                self._latents[record_idx] = self._encode_record(record_idx, None)
            return self._latents[record_idx]
        return self._encode_record(record_idx, rng)

    # ---- captions -----------------------------------------------------------------------------------
    def caption(self, record_idx: int, rng: random.Random) -> str:
        cfg = self.cfg
        return process_caption(self.records[record_idx].caption, shuffle=cfg.shuffle_caption,
                               keep_tokens=cfg.keep_tokens, dropout_rate=cfg.caption_dropout_rate, rng=rng)

    def conditioning(self, captions: list[str]) -> dict:
        if not self.cache_text:
            return self.backbone.encode_text(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._conds]
        with torch.no_grad():
            for c in missing:  # one caption at a time, for batch-independent values
                self._conds[c] = {k: v[0].detach() for k, v in self.backbone.encode_text([c]).items()}
        return {k: torch.stack([self._conds[c][k] for c in captions]) for k in self._conds[captions[0]]}

    # ---- one micro-batch ----------------------------------------------------------------------------
    def batch(self, epoch: int, items: list[tuple[int, int]]):
        latents, captions, noises, timesteps = [], [], [], []
        num_timesteps = len(self.backbone.alphas_cumprod)
        for position, record_idx in items:
            rng = sample_rng(self.cfg.seed, epoch, position)
            latent = self.latent(record_idx, rng)
            captions.append(self.caption(record_idx, rng))
            g = torch.Generator().manual_seed(rng.getrandbits(63))
            noise = torch.randn(latent.shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((latent.shape[0], 1, 1), generator=g)
            timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            latents.append(latent)
            noises.append(noise)
        return (torch.stack(latents), captions, torch.stack(noises), torch.tensor(timesteps, dtype=torch.long))
