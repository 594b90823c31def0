"""Turning a (position in epoch, record) pair into training inputs, reproducibly.

Every random choice for a sample (crop, caption shuffle/dropout, noise, timestep) comes from an RNG
seeded by (seed, epoch, position) alone. So the draws do not depend on batch size, on how many
steps ran in this process, on previews, or on an out-of-memory retry at a smaller micro-batch: a
resumed run and an uninterrupted one see identical inputs.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from ..contracts.backbone import Conditioning, DiffusionBackbone, SizeInfo
from ..data.captions import process_caption
from ..data.images import load_rgb, pixel_limit, resize_and_crop, to_tensor
from ..data.order import sample_rng
from .caches import DiskCache, cache_key, default_cache_dir

log = logging.getLogger("lora_trainer")


class SampleSource:
    def __init__(self, cfg, index, backbone: DiffusionBackbone, buckets):
        self.cfg = cfg
        self.records = index.records
        self.backbone = backbone
        self.buckets = buckets                      # data.buckets.BucketPlan
        identity = backbone.identity()
        self.model_hash = identity.get("hash", "")
        # The WebUI encodes captions its own way (its prompt parser, CLIP-skip setting, conditioning
        # keys: SDXL's `vector`, not `text_embeds`): the same model's text embeddings are not the
        # headless ones, so they are cached apart. Latents are the same and stay shared.
        self.text_host = identity.get("host")
        self._latents: dict[int, tuple[torch.Tensor, SizeInfo]] = {}
        self._conds: dict[tuple, Conditioning] = {}
        # With a random crop each epoch sees other pixels, so latents cannot be cached.
        self.cache_latents = not cfg.random_crop
        # A trained text encoder changes the embeddings every step.
        self.cache_text = not cfg.train_text_encoder
        folder = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        on_disk = cfg.cache_latents_to_disk
        self.latent_disk = DiskCache(folder, "latents") if on_disk and self.cache_latents else None
        # shuffled captions are new strings every epoch: caching them on disk would only grow
        self.text_disk = (DiskCache(folder, "text") if on_disk and self.cache_text and not cfg.shuffle_caption
                          else None)

    def cache_notes(self) -> list[str]:
        notes = []
        if not self.cache_latents:
            notes.append("random_crop is on: latents are encoded every step (no latent cache)")
        if not self.cache_text:
            notes.append("train_text_encoder is on: captions are encoded every step (no text cache)")
        elif self.cfg.shuffle_caption:
            notes.append("shuffle_caption is on: captions are encoded every step (every shuffle is a new "
                         "caption, so a cache would only grow)")
        if self.latent_disk:
            notes.append(f"latent cache: {self.latent_disk.folder}")
        return notes

    # ---- latents -----------------------------------------------------------------------------------
    def _encode_record(self, record_idx: int, rng: random.Random | None) -> tuple[torch.Tensor, SizeInfo]:
        record = self.records[record_idx]
        width, height = self.buckets.per_record[record_idx]
        img = load_rgb(record.path, pixel_limit(self.cfg.max_image_megapixels))
        crop = "random" if rng is not None else "center"
        img, (top, left), original = resize_and_crop(img, width, height, crop=crop, rng=rng)
        # The VAE sample's seed comes from the image bytes, so a cached latent is valid for any
        # run (any seed, any dataset order) that uses the same image, crop and model.
        seed = rng.getrandbits(63) if rng is not None else int(record.sha256[:15], 16)
        generator = torch.Generator().manual_seed(seed)
        # one image at a time: the result must not depend on which images share a batch
        latent = self.backbone.encode_image(to_tensor(img).unsqueeze(0), generator)[0].cpu()
        return latent, {"original": tuple(original), "crop": (top, left), "target": (height, width)}

    def _cached_latent(self, record_idx: int) -> tuple[torch.Tensor, SizeInfo]:
        record = self.records[record_idx]
        bucket = self.buckets.per_record[record_idx]
        tile = self.backbone.vae_tile_size
        # tiled latents differ from whole-image ones: their own entries (keys unchanged otherwise)
        tiling = {"vae_tile": tile} if tile and max(bucket) > tile else {}
        key = cache_key(kind="latent", image=record.sha256, bucket=bucket, crop="center",
                        model=self.model_hash, **tiling)
        if self.latent_disk:
            hit = self.latent_disk.get(key)
            if hit is not None:
                flat_sizes = hit["sizes"].tolist()
                return hit["latent"], {"original": tuple(flat_sizes[0:2]), "crop": tuple(flat_sizes[2:4]),
                                       "target": tuple(flat_sizes[4:6])}
        latent, sizes = self._encode_record(record_idx, None)
        if self.latent_disk:
            flat = [*sizes["original"], *sizes["crop"], *sizes["target"]]
            self.latent_disk.put(key, {"latent": latent, "sizes": torch.tensor(flat, dtype=torch.int64)})
        return latent, sizes

    def precompute_latents(self, progress=None) -> None:
        if not self.cache_latents:
            return
        for i in range(len(self.records)):
            if i not in self._latents:
                self._latents[i] = self._cached_latent(i)
            if progress:
                progress(i + 1, len(self.records))

    def latent(self, record_idx: int, rng: random.Random) -> tuple[torch.Tensor, SizeInfo]:
        if self.cache_latents:
            if record_idx not in self._latents:
                self._latents[record_idx] = self._cached_latent(record_idx)
            return self._latents[record_idx]
        return self._encode_record(record_idx, rng)

    # ---- captions -----------------------------------------------------------------------------------
    def caption(self, record_idx: int, rng: random.Random) -> str:
        cfg = self.cfg
        return process_caption(self.records[record_idx].caption, shuffle=cfg.shuffle_caption,
                               keep_tokens=cfg.keep_tokens, dropout_rate=cfg.caption_dropout_rate, rng=rng)

    def _text_key(self, caption: str, sizes: SizeInfo) -> tuple:
        return (caption, tuple(sorted(sizes.items())) if self.backbone.conditioning_uses_sizes else None)

    def _encode_one(self, caption: str, sizes: SizeInfo) -> Conditioning:
        # the host is always in the key, so entries of versions that keyed only the model (where
        # the WebUI's and the headless embeddings could be mixed up) are never read again
        # half-precision text encoders give other embeddings than fp32 ones (keys of fp32 unchanged)
        dtype = self.backbone.dtype
        precision = {"dtype": str(dtype)} if dtype != torch.float32 else {}
        key = cache_key(kind="text", caption=caption, sizes=self._text_key(caption, sizes)[1],
                        model=self.model_hash, host=self.text_host or "headless", **precision)
        if self.text_disk:
            hit = self.text_disk.get(key)
            if hit is not None:
                return hit
        with torch.no_grad():  # one caption at a time, for batch-independent values
            cond = {k: v[0].detach().cpu() for k, v in self.backbone.encode_text([caption], [sizes]).items()}
        if self.text_disk:
            self.text_disk.put(key, cond)
        return cond

    @property
    def conditioning_all_cached(self) -> bool:
        """Every caption's embedding is known before the first step and never changes: the text
        encoders are not needed again for training (see precompute_conditioning)."""
        return self.cache_text and not self.cfg.shuffle_caption and self.cache_latents

    def precompute_conditioning(self) -> None:
        """Encode every caption once, before the first step, when the conditioning depends on the
        record alone (no shuffling; cached latents, whose sizes are SDXL's size conditioning). The
        values are the ones the first epoch would compute (one caption at a time), only earlier:
        the text encoder is then done before the UNet starts, which is what the WebUI's --medvram
        needs (it swaps the two on and off the GPU whenever the other runs)."""
        if not self.conditioning_all_cached:
            return
        with_dropout = self.cfg.caption_dropout_rate > 0
        for i, record in enumerate(self.records):
            sizes = self._latents[i][1] if i in self._latents else self._cached_latent(i)[1]
            for caption in [record.caption, ""] if with_dropout else [record.caption]:
                key = self._text_key(caption, sizes)
                if key not in self._conds:
                    self._conds[key] = self._encode_one(caption, sizes)

    def conditioning(self, captions: list[str], sizes: list[SizeInfo]) -> Conditioning:
        if not self.cache_text:
            return self.backbone.encode_text(captions, sizes)
        if self.cfg.shuffle_caption:   # memory would grow with every new shuffle: do not keep them
            conds = [self._encode_one(c, s) for c, s in zip(captions, sizes)]
        else:
            keys = [self._text_key(c, s) for c, s in zip(captions, sizes)]
            for key, caption, size in zip(keys, captions, sizes):
                if key not in self._conds:
                    self._conds[key] = self._encode_one(caption, size)
            conds = [self._conds[key] for key in keys]
        device = self.backbone.device
        return {k: torch.stack([c[k] for c in conds]).to(device) for k in conds[0]}

    # ---- one micro-batch ----------------------------------------------------------------------------
    def batch(self, epoch: int, items: list[tuple[int, int]]):
        latents, captions, noises, timesteps, sizes = [], [], [], [], []
        num_timesteps = len(self.backbone.alphas_cumprod)
        for position, record_idx in items:
            rng = sample_rng(self.cfg.seed, epoch, position)
            latent, size = self.latent(record_idx, rng)
            captions.append(self.caption(record_idx, rng))
            g = torch.Generator().manual_seed(rng.getrandbits(63))
            noise = torch.randn(latent.shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((latent.shape[0], 1, 1), generator=g)
            timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            latents.append(latent)
            noises.append(noise)
            sizes.append(size)
        return (torch.stack(latents), captions, torch.stack(noises),
                torch.tensor(timesteps, dtype=torch.long), sizes)
