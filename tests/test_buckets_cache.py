"""Aspect-ratio buckets and the persistent latent/text cache."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lora_trainer.config import load_config
from lora_trainer.data.buckets import BucketPlan, BucketSpec, assign_bucket, make_buckets
from lora_trainer.data.discovery import discover
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.training.plan import epoch_batches
from lora_trainer.app.session import train_from_config


def test_buckets_fit_the_area_and_the_step():
    spec = BucketSpec(resolution=512, min_reso=256, max_reso=1024, step=64)
    buckets = make_buckets(spec)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
    assert (w := assign_bucket(768, 1024, buckets)) and abs(w[0] / w[1] - 0.75) < 0.08      # 3:4 portrait
    wide = assign_bucket(1920, 1080, buckets)
    assert wide[0] > wide[1] and abs(math.log(wide[0] / wide[1]) - math.log(16 / 9)) < 0.15


def make_mixed_dataset(folder: Path) -> Path:
    """3:4 portraits and 16:9 landscapes, captioned."""
    folder.mkdir(parents=True)
    for i in range(4):
        for name, size in (("portrait", (96, 128)), ("landscape", (224, 126))):
            img = Image.new("RGB", size, (40 * i, 90, 200 - 30 * i))
            ImageDraw.Draw(img).ellipse((10, 10, size[0] - 10, size[1] - 10), fill=(250, 200, 0))
            img.save(folder / f"{name}_{i}.png")
            (folder / f"{name}_{i}.txt").write_text(f"a {name}, yellow disc, style {i}")
    return folder


@pytest.fixture
def mixed(tmp_path):
    return make_mixed_dataset(tmp_path / "mixed")


def test_no_batch_mixes_buckets_and_aspect_is_kept(mixed, make_config):
    cfg = load_config(make_config(train_data_dir=mixed, resolution=128, bucket_reso_steps=32, batch_size=3))
    index = discover(cfg.train_data_dir)
    plan = BucketPlan.for_index(index, BucketSpec.from_config(cfg))
    by_name = {r.rel_path.split("_")[0]: plan.per_record[i] for i, r in enumerate(index.records)}
    portrait, landscape = by_name["portrait"], by_name["landscape"]
    assert portrait[0] < portrait[1] and landscape[0] > landscape[1]
    for epoch in range(3):
        for batch in epoch_batches(index, epoch, cfg.seed, cfg.batch_size, plan.per_record):
            assert len({plan.per_record[r] for _, r in batch}) == 1


def test_mixed_aspect_dataset_trains_and_records_its_buckets(mixed, make_config):
    result = train_from_config(load_config(make_config(train_data_dir=mixed, resolution=128,
                                                       bucket_reso_steps=32, epochs=1)))
    _, meta = read_lora_file(result.lora_path)
    info = json.loads(meta["ss_bucket_info"])
    resolutions = {tuple(b["resolution"]) for b in info["buckets"].values()}
    assert len(resolutions) == 2 and sum(b["count"] for b in info["buckets"].values()) == 8
    assert meta["ss_enable_bucket"] == "True"


def count_vae_calls(monkeypatch):
    from lora_trainer.backbones.diffusers_sd import DiffusersBackbone

    calls = {"n": 0}
    original = DiffusersBackbone.encode_image

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)
    monkeypatch.setattr(DiffusersBackbone, "encode_image", counting)
    return calls


def test_second_run_reuses_the_cache_and_a_change_misses(make_config, tmp_path, monkeypatch, shapes_dataset):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dataset, data)
    cache = tmp_path / "cache"
    calls = count_vae_calls(monkeypatch)
    first = train_from_config(load_config(make_config("a", train_data_dir=data, cache_dir=cache, epochs=1)))
    assert calls["n"] == 6                                  # every image encoded once
    second = train_from_config(load_config(make_config("b", train_data_dir=data, cache_dir=cache, epochs=1)))
    assert calls["n"] == 6                                  # all from the cache
    ta, _ = read_lora_file(first.lora_path)
    tb, _ = read_lora_file(second.lora_path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)       # and the cache changes nothing
    # a changed image misses (only that one)
    victim = sorted(data.rglob("*.png"))[0]
    Image.new("RGB", (64, 64), "white").save(victim)
    train_from_config(load_config(make_config("c", train_data_dir=data, cache_dir=cache, epochs=1)))
    assert calls["n"] == 7
    # another resolution (another bucket) misses everything
    train_from_config(load_config(make_config("d", train_data_dir=data, cache_dir=cache, epochs=1,
                                              resolution=128)))
    assert calls["n"] == 13


def test_a_flipped_byte_in_a_cache_file_is_detected_and_recomputed(make_config, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    calls = count_vae_calls(monkeypatch)
    first = train_from_config(load_config(make_config("a", cache_dir=cache, epochs=1)))
    entry = sorted((cache / "latents").rglob("*.safetensors"))[0]
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x10                                       # inside the tensor bytes
    entry.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lora_trainer"):
        second = train_from_config(load_config(make_config("b", cache_dir=cache, epochs=1)))
    assert "corrupt" in caplog.text and calls["n"] == 7
    ta, _ = read_lora_file(first.lora_path)
    tb, _ = read_lora_file(second.lora_path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_caching_is_skipped_and_said_so_when_it_would_be_wrong(make_config, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="lora_trainer"):
        train_from_config(load_config(make_config(cache_dir=cache, epochs=1, random_crop=True,
                                                  train_text_encoder=True)))
    assert "no latent cache" in caplog.text and "no text cache" in caplog.text
    assert not (cache / "latents").exists()


def test_upscaled_images_are_named_in_a_warning(tmp_path, make_config, caplog):
    data = tmp_path / "small"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 90, 20, 20)).save(data / f"s{i}.png")
        (data / f"s{i}.txt").write_text("tiny")
    with caplog.at_level("WARNING", logger="lora_trainer"):
        train_from_config(load_config(make_config(train_data_dir=data, resolution=128, epochs=1,
                                                  check_data=False) if _has_check_data() else
                                      make_config(train_data_dir=data, resolution=128, epochs=1)))
    assert "max_upscale_factor" in caplog.text and "s0.png" in caplog.text


def _has_check_data() -> bool:
    from lora_trainer.config.schema import TrainConfig
    return "check_data" in TrainConfig.__dataclass_fields__


def test_shuffled_captions_are_not_kept_in_memory(make_config, caplog):
    from lora_trainer.training import samples

    kept = []
    original = samples.SampleSource.conditioning

    def spy(self, captions, sizes):
        out = original(self, captions, sizes)
        kept.append(len(self._conds))
        return out
    samples.SampleSource.conditioning = spy
    try:
        with caplog.at_level("INFO", logger="lora_trainer"):
            result = train_from_config(load_config(make_config(epochs=2, shuffle_caption=True, keep_tokens=1)))
    finally:
        samples.SampleSource.conditioning = original
    assert result.status == "finished" and kept and max(kept) == 0
    assert "shuffle_caption is on" in caplog.text
    assert "Base model: SD1" in caplog.text   # the detected family is said


def test_captions_are_encoded_before_the_first_step_and_change_nothing(make_config, monkeypatch):
    """All text encoding happens before the UNet's first step (the WebUI's --medvram swaps the text
    encoder and the UNet on and off the GPU whenever the other runs), with caption dropout's empty
    caption too; the LoRA is the one the lazy, first-epoch encoding gives, bit for bit."""
    from lora_trainer.backbones.diffusers_sd import DiffusersBackbone
    from lora_trainer.training import samples

    events = []
    encode_text, predict = DiffusersBackbone.encode_text, DiffusersBackbone.predict
    monkeypatch.setattr(DiffusersBackbone, "encode_text",
                        lambda self, *a, **k: events.append("text") or encode_text(self, *a, **k))
    monkeypatch.setattr(DiffusersBackbone, "predict",
                        lambda self, *a, **k: events.append("unet") or predict(self, *a, **k))
    values = dict(epochs=2, caption_dropout_rate=0.3, cache_latents_to_disk=False, write_card=False)
    early = train_from_config(load_config(make_config("early", **values)))
    assert "unet" in events and "text" not in events[events.index("unet"):]
    assert events.count("text") == 7                       # 6 captions and the dropped one ("")
    monkeypatch.setattr(samples.SampleSource, "precompute_conditioning", lambda self: None)
    events.clear()
    lazy = train_from_config(load_config(make_config("lazy", **values)))
    assert "text" in events[events.index("unet"):]          # the control: encoded while training
    ta, tb = read_lora_file(early.lora_path)[0], read_lora_file(lazy.lora_path)[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
