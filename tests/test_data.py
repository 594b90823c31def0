"""Tests for lora_trainer.data: image loading, discovery, captions and sample order.

All images are tiny and made with Pillow in tmp_path, so the whole file runs in a few seconds.
"""
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lora_trainer.data import (DataError, UnreadableImage, batches, discover, epoch_samples,
                               load_rgb, probe_size, process_caption, resize_and_crop, sample_rng,
                               sample_seed, to_rgb, to_tensor, top_tags)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save_image(path: Path, size=(16, 12), color=RED, mode="RGB", fmt=None, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **save_args)
    return path


def write_caption(image_path: Path, text: str, encoding="utf-8") -> None:
    image_path.with_suffix(".txt").write_text(text, encoding=encoding)


def close_to(pixel, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# ---- images.py -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp", "a.bmp", "A.PNG", "b.JPG"])
def test_every_supported_format_loads_as_rgb(tmp_path, name):
    path = save_image(tmp_path / name, color=RED)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 12)
    assert close_to(image.getpixel((8, 6)), RED)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored 40x20 with red left half / blue right half, EXIF orientation 6 ("rotate 90 CW").
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    image = load_rgb(path)
    assert image.size == (20, 40)                    # portrait now
    assert close_to(image.getpixel((10, 5)), RED)    # the left half rotated to the top
    assert close_to(image.getpixel((10, 35)), BLUE)
    assert probe_size(path) == (20, 40)              # header-only probe agrees


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))       # fully transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))              # one opaque red pixel
    path = tmp_path / "cutout.png"
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.getpixel((4, 4)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == RED


def test_half_transparent_la_and_palette_transparency_use_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 128))                # black at ~50% alpha -> mid grey
    la.save(tmp_path / "la.png")
    assert close_to(load_rgb(tmp_path / "la.png").getpixel((1, 1)), (127, 127, 127), 2)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)      # palette entry 0 (black) transparent
    loaded = load_rgb(tmp_path / "p.png")
    assert loaded.getpixel((2, 2)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == RED


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64), (8, 1)).astype(np.uint16)   # left-right ramp
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")                # really a 16-bit file
    pixels = np.asarray(load_rgb(path))
    assert pixels.min() == 0 and pixels.max() == 255
    assert 120 <= pixels[4, 32, 0] <= 135                 # middle of the ramp is mid grey
    assert 0.3 < (pixels[..., 0] > 127).mean() < 0.7      # not mostly white (clipped) or black


def test_32_bit_int_mode_is_treated_as_16_bit():
    values = np.array([[0, 32768, 65535]], dtype=np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_greyscale_and_cmyk_jpeg(tmp_path):
    save_image(tmp_path / "grey.png", mode="L", color=200)
    assert load_rgb(tmp_path / "grey.png").getpixel((1, 1)) == (200, 200, 200)

    save_image(tmp_path / "print.jpg", mode="CMYK", color=(0, 255, 255, 0))  # CMYK red
    loaded = load_rgb(tmp_path / "print.jpg")
    assert loaded.mode == "RGB"
    assert close_to(loaded.getpixel((4, 4)), RED, 20)


def truncate(path: Path, keep_fraction=0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def noisy_jpeg(path: Path) -> Path:
    # Noise so the JPEG body is big enough that cutting it in half really truncates pixel data.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_truncated_and_empty_files_raise_unreadable(tmp_path):
    bad = truncate(noisy_jpeg(tmp_path / "cut.jpg"))
    with pytest.raises(UnreadableImage) as info:
        load_rgb(bad)
    assert info.value.path == str(bad) and "truncated" in info.value.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False       # never switched on globally

    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty file"):
        load_rgb(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UnreadableImage, match="not a recognisable image"):
        load_rgb(tmp_path / "text.png")


def test_resize_and_crop_center_covers_target():
    image = Image.new("RGB", (200, 100), RED)
    out, (top, left), original = resize_and_crop(image, 64, 64)
    assert out.size == (64, 64)
    assert original == (100, 200)
    assert (top, left) == (0, 32)                         # resized to 128x64, centred


def test_resize_and_crop_random_is_seeded_and_in_bounds():
    image = Image.new("RGB", (300, 100), RED)
    first = resize_and_crop(image, 50, 50, "random", random.Random(3))[1]
    again = resize_and_crop(image, 50, 50, "random", random.Random(3))[1]
    assert first == again
    offsets = {resize_and_crop(image, 50, 50, "random", random.Random(s))[1] for s in range(30)}
    assert len(offsets) > 5
    assert all(top == 0 and 0 <= left <= 100 for top, left in offsets)
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop(image, 50, 50, "random", None)


def test_resize_upscales_small_images_to_cover():
    out, crop, original = resize_and_crop(Image.new("RGB", (10, 20), RED), 64, 32)
    assert out.size == (64, 32) and original == (20, 10)
    assert crop[1] == 0 and crop[0] == (128 - 32) // 2


def test_to_tensor_range_and_layout():
    image = Image.new("RGB", (3, 2), (255, 0, 128))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[0].eq(1.0).all() and tensor[1].eq(-1.0).all()
    assert abs(tensor[2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6


# ---- discovery.py --------------------------------------------------------------------------------

def test_flat_folder_with_sidecars_and_bom(tmp_path):
    save_image(tmp_path / "b.png")
    write_caption(tmp_path / "b.png", "second")
    save_image(tmp_path / "a.webp", size=(20, 10))
    (tmp_path / "a.txt").write_bytes("\ufefffirst, tag".encode("utf-8"))   # BOM must not leak
    save_image(tmp_path / "c.bmp")
    write_caption(tmp_path / "c.bmp", "third")

    index = discover(tmp_path)
    assert [r.rel_path for r in index.records] == ["a.webp", "b.png", "c.bmp"]
    assert [r.caption for r in index.records] == ["first, tag", "second", "third"]
    first = index.records[0]
    assert (first.width, first.height, first.repeats, first.folder) == (20, 10, 1, "")
    assert len(first.sha256) == 64 and first.caption_source == "sidecar"
    assert index.num_images == 3 and index.num_samples == 3
    assert index.warnings == []
    # Images outside N_ folders are grouped under the dataset folder's name.
    assert index.tag_frequency() == {
        f"1_{tmp_path.name}": {"first": 1, "tag": 1, "second": 1, "third": 1}}


def test_windows_encoded_and_multiline_captions(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, naïve".encode("utf-16"))      # Notepad "Unicode"
    save_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("café".encode("cp1252"))             # Notepad "ANSI"
    save_image(tmp_path / "c.png")
    write_caption(tmp_path / "c.png", "line one,\nline two\n\n")
    index = discover(tmp_path)
    assert [r.caption for r in index.records] == ["café, naïve", "café", "line one, line two"]
    assert sum("not UTF-8" in w for w in index.warnings) == 1


def test_kohya_repeat_folders(tmp_path):
    for name in ("x.png", "y.png"):
        save_image(tmp_path / "10_mychar" / name)
    save_image(tmp_path / "10_mychar" / "closeups" / "z.png")   # inherits the 10 repeats
    save_image(tmp_path / "misc" / "w.png")                      # plain folder: default repeats
    index = discover(tmp_path, default_repeats=2)
    by_path = {r.rel_path: r for r in index.records}
    assert by_path["10_mychar/x.png"].repeats == 10
    assert by_path["10_mychar/x.png"].folder == "mychar"
    assert by_path["10_mychar/closeups/z.png"].repeats == 10
    assert (by_path["misc/w.png"].repeats, by_path["misc/w.png"].folder) == (2, "")
    assert index.num_samples == 32


def test_metadata_csv_with_quoted_commas_wins_over_sidecar(tmp_path):
    save_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.png", "sidecar caption")
    save_image(tmp_path / "sub" / "b.png")
    write_caption(tmp_path / "sub" / "b.png", "only a sidecar")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\n"a.png","a photo, of sks, dog"\n', encoding="utf-8")
    index = discover(tmp_path)                                   # found without metadata_path
    captions = {r.rel_path: (r.caption, r.caption_source) for r in index.records}
    assert captions["a.png"] == ("a photo, of sks, dog", "csv")
    assert captions["sub/b.png"] == ("only a sidecar", "sidecar")
    assert index.metadata_path == str(tmp_path / "metadata.csv")


def test_metadata_csv_paths_relative_to_its_own_folder(tmp_path):
    save_image(tmp_path / "data" / "images" / "a.png")
    csv_path = tmp_path / "data" / "images" / "captions.csv"
    csv_path.write_text("file_name,text\na.png,hello\n", encoding="utf-8")
    index = discover(tmp_path / "data", metadata_path=csv_path)
    assert [(r.rel_path, r.caption) for r in index.records] == [("images/a.png", "hello")]


def test_metadata_csv_missing_files_are_all_named(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\na.png,ok\nghost.png,boo\nalso_gone.jpg,x\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    message = str(info.value)
    assert "ghost.png" in message and "row 2" in message
    assert "also_gone.jpg" in message and "row 3" in message
    assert len(info.value.problems) == 2


def test_metadata_csv_needs_header(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("a.png,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="file_name,text"):
        discover(tmp_path)


def test_missing_captions_warned_once_with_count(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        save_image(tmp_path / name)
    write_caption(tmp_path / "c.png", "has one")
    index = discover(tmp_path)
    assert [r.caption for r in index.records] == ["", "", "has one"]
    caption_warnings = [w for w in index.warnings if "no caption" in w]
    assert len(caption_warnings) == 1
    assert caption_warnings[0].startswith("2 image(s)") and "a.png" in caption_warnings[0]


def test_hidden_non_image_and_unsupported_files(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / ".hidden.png")
    save_image(tmp_path / ".cache" / "b.png")
    save_image(tmp_path / "__MACOSX" / "c.png")
    (tmp_path / "notes.md").write_text("hello")
    save_image(tmp_path / "anim.gif", mode="P", color=0)
    (tmp_path / "phone.HEIC").write_bytes(b"\0" * 10)
    index = discover(tmp_path)
    assert [r.rel_path for r in index.records] == ["a.png"]
    unsupported = [w for w in index.warnings if "unsupported" in w]
    assert len(unsupported) == 1
    assert "anim.gif" in unsupported[0] and "phone.HEIC" in unsupported[0]


def test_truncated_jpeg_fail_lists_all_bad_images(tmp_path):
    save_image(tmp_path / "good.png")
    truncate(noisy_jpeg(tmp_path / "cut.jpg"))
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        discover(tmp_path, bad_image_policy="fail")
    message = str(info.value)
    assert "cut.jpg" in message and "truncated" in message
    assert "zero.png" in message and "bad_image_policy" in message
    assert len(info.value.problems) == 2


def test_truncated_jpeg_skip_warns_per_image(tmp_path):
    save_image(tmp_path / "good.png")
    truncate(noisy_jpeg(tmp_path / "cut.jpg"))
    index = discover(tmp_path, bad_image_policy="skip")
    assert [r.rel_path for r in index.records] == ["good.png"]
    skipped = [w for w in index.warnings if w.startswith("Skipped unreadable image")]
    assert len(skipped) == 1 and "cut.jpg" in skipped[0]


def test_empty_dataset_error_names_folder_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and ".png" in message and ".webp" in message


def test_missing_root_and_bad_policy(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(DataError, match="bad_image_policy"):
        discover(tmp_path, bad_image_policy="ignore")


def test_zero_repeat_folder_is_skipped_with_warning(tmp_path):
    save_image(tmp_path / "0_reg" / "a.png")
    save_image(tmp_path / "3_char" / "b.png")
    index = discover(tmp_path)
    assert [r.rel_path for r in index.records] == ["3_char/b.png"]
    assert any("0_reg" in w and "0 repeats" in w for w in index.warnings)


def test_manifest_hash_tracks_captions_images_and_repeats(tmp_path):
    save_image(tmp_path / "5_x" / "a.png")
    write_caption(tmp_path / "5_x" / "a.png", "one")
    baseline = discover(tmp_path).manifest_hash()
    assert discover(tmp_path).manifest_hash() == baseline          # stable

    write_caption(tmp_path / "5_x" / "a.png", "two")
    changed_caption = discover(tmp_path).manifest_hash()
    assert changed_caption != baseline

    save_image(tmp_path / "5_x" / "a.png", color=BLUE)
    assert discover(tmp_path).manifest_hash() != changed_caption


def test_tag_frequency_is_kohya_style(tmp_path):
    save_image(tmp_path / "10_char" / "a.png")
    write_caption(tmp_path / "10_char" / "a.png", "sks, smile, red hair")
    save_image(tmp_path / "10_char" / "b.png")
    write_caption(tmp_path / "10_char" / "b.png", "sks,  smile")
    frequency = discover(tmp_path).tag_frequency()
    assert frequency == {"10_char": {"sks": 2, "smile": 2, "red hair": 1}}


def test_check_images_false_reads_headers_only(tmp_path):
    save_image(tmp_path / "a.png", size=(30, 20))
    truncate(noisy_jpeg(tmp_path / "cut.jpg"), keep_fraction=0.6)
    index = discover(tmp_path, check_images=False)     # header is intact, so not detected
    assert {(r.rel_path, r.width, r.height) for r in index.records} == {
        ("a.png", 30, 20), ("cut.jpg", 64, 64)}


# ---- captions.py ---------------------------------------------------------------------------------

CAPTION = "sks, woman, red hair, smile, outdoors, hat, blue sky"


def test_shuffle_keeps_leading_tokens_and_is_deterministic():
    outputs = set()
    for seed in range(20):
        result = process_caption(CAPTION, shuffle=True, keep_tokens=2, dropout_rate=0.0,
                                 rng=random.Random(seed))
        tags = result.split(", ")
        assert tags[:2] == ["sks", "woman"]
        assert sorted(tags) == sorted(CAPTION.split(", "))
        again = process_caption(CAPTION, shuffle=True, keep_tokens=2, dropout_rate=0.0,
                                rng=random.Random(seed))
        assert again == result
        outputs.add(result)
    assert len(outputs) > 10


def test_no_shuffle_returns_caption_unchanged():
    assert process_caption(CAPTION, shuffle=False, keep_tokens=1, dropout_rate=0.0,
                           rng=random.Random(0)) == CAPTION


def test_dropout_rate_is_roughly_respected():
    rng = random.Random(1234)
    dropped = sum(process_caption(CAPTION, shuffle=True, keep_tokens=0, dropout_rate=0.25,
                                  rng=rng) == "" for _ in range(4000))
    assert 0.22 < dropped / 4000 < 0.28


def test_dropout_decision_does_not_depend_on_caption():
    def decisions(caption):
        return [process_caption(caption, shuffle=True, keep_tokens=0, dropout_rate=0.5,
                                rng=random.Random(seed)) == "" for seed in range(200)]
    assert decisions("a") == decisions(CAPTION)


def test_top_tags_counts_images():
    class Rec:
        def __init__(self, caption):
            self.caption = caption
    records = [Rec("a, b"), Rec("b, c"), Rec("b, a, a")]
    assert top_tags(records, 2) == [("b", 3), ("a", 2)]


# ---- order.py ------------------------------------------------------------------------------------

def test_epoch_order_deterministic_and_respects_repeats():
    repeats = [3, 1, 5, 2]
    order = epoch_samples(repeats, epoch=0, seed=42)
    assert order == epoch_samples(repeats, epoch=0, seed=42)
    assert Counter(order) == {0: 3, 1: 1, 2: 5, 3: 2}
    assert epoch_samples(repeats, epoch=1, seed=42) != order
    assert epoch_samples(repeats, epoch=0, seed=43) != order


def test_epoch_order_from_dataset_index(tmp_path):
    save_image(tmp_path / "4_a" / "x.png")
    save_image(tmp_path / "2_b" / "y.png")
    index = discover(tmp_path)
    order = epoch_samples(index, epoch=3, seed=7)
    assert len(order) == index.num_samples == 6
    assert Counter(order) == {i: r.repeats for i, r in enumerate(index.records)}


def test_sample_rng_is_keyed_by_position_not_batching():
    draws = [sample_rng(42, 2, position).random() for position in range(10)]
    assert draws == [sample_rng(42, 2, position).random() for position in range(10)]
    assert len(set(draws)) == 10
    assert sample_rng(42, 3, 0).random() != draws[0]
    assert sample_seed(-1, 0, 0) != sample_seed(1, 0, 0)


def test_batches_keep_last_partial_batch():
    assert batches([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    assert batches([], 4) == []
    with pytest.raises(ValueError):
        batches([1], 0)
