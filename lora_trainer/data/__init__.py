"""Data layer: find images and captions, load them as clean RGB, and order samples reproducibly.

    index = discover(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension, cfg.repeats,
                     cfg.bad_image_policy)
    for position, record_id in enumerate(epoch_samples(index, epoch, cfg.seed)):
        rng = sample_rng(cfg.seed, epoch, position)
        image, crop_top_left, original_size = resize_and_crop(
            load_rgb(index.records[record_id].path), w, h,
            "random" if cfg.random_crop else "center", rng)
        caption = process_caption(index.records[record_id].caption, shuffle=cfg.shuffle_caption,
                                  keep_tokens=cfg.keep_tokens,
                                  dropout_rate=cfg.caption_dropout_rate, rng=rng)
"""
from .captions import process_caption, split_tags, top_tags
from .discovery import (BAD_IMAGE_POLICIES, DataError, DatasetIndex, ImageRecord, discover)
from .images import (SUPPORTED_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, UnreadableImage,
                     is_supported_image, load_rgb, probe_size, resize_and_crop, to_rgb, to_tensor)
from .order import batches, epoch_samples, sample_rng, sample_seed

__all__ = [
    "BAD_IMAGE_POLICIES", "DataError", "DatasetIndex", "ImageRecord", "SUPPORTED_EXTENSIONS",
    "UNSUPPORTED_IMAGE_EXTENSIONS", "UnreadableImage", "batches", "discover", "epoch_samples",
    "is_supported_image", "load_rgb", "probe_size", "process_caption", "resize_and_crop",
    "sample_rng", "sample_seed", "split_tags", "to_rgb", "to_tensor", "top_tags",
]
