"""task_type: sd — a Stable Diffusion LoRA from images and captions, written as a kohya file.

The pieces stay where they grew (data/ discovery and buckets, backbones/ the diffusers models,
training/samples.py + caches.py + objective.py, preview/, datatools/); this package is the one
place that puts them behind the task interface (`tasks/protocol.py`).
"""
from __future__ import annotations


class SDTask:
    name = "sd"

    def load_backbone(self, cfg, device, dtype):
        from ...backbones.diffusers_sd import load_backbone  # diffusers only for headless runs

        return load_backbone(cfg.base_model, cfg.base_model_config, device=device, dtype=dtype,
                             prediction_type=cfg.prediction_type)

    def index_dataset(self, cfg):
        from ...data.discovery import discover
        from ...data.images import pixel_limit

        return discover(cfg.train_data_dir, metadata_path=cfg.metadata_path,
                        caption_extension=cfg.caption_extension, default_repeats=cfg.repeats,
                        bad_image_policy=cfg.bad_image_policy, max_pixels=pixel_limit(cfg.max_image_megapixels))

    def check_data(self, index, cfg, logger=None, findings=None):
        from ...datatools.checks import check_before_training

        return check_before_training(index, cfg, logger, findings)

    def training(self, cfg, backbone, index):
        from .training import SDTraining

        return SDTraining(cfg, backbone, index)

    def previewer(self, cfg):
        from ...preview.card_thumbnail import CardThumbnail
        from ...preview.engine import Previewer

        if cfg.preview_prompts:
            return Previewer(cfg)   # parses prompts and finds named LoRAs: fails early
        if cfg.write_card:          # no prompts: one render for the card
            return CardThumbnail(cfg, lambda prompts: Previewer(cfg, prompts=prompts))
        return None

    def observers(self, cfg, backbone, index) -> list:
        from ...preview.cards import CardWriter

        return [CardWriter(cfg, backbone, index)] if cfg.write_card else []


TASK = SDTask()
