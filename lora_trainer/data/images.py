"""Loading training images into clean 8-bit RGB, and resizing/cropping them to the training size.

Everything that can go wrong with a user's image file is turned into `UnreadableImage(path, reason)`
here, so the discovery step can collect *all* bad files and report them together instead of the
run dying on the first one half-way through an epoch.
"""
from __future__ import annotations

import os
import random
import re
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, "os.PathLike[str]"]

# Formats we train on. Pillow reads all of them without optional plugins.
SUPPORTED_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Image-like files people often drop into a dataset folder that we do not train on. Discovery warns
# about these by name (instead of silently ignoring them) so a user wondering "why are only 12 of my
# 20 images used?" gets an answer.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({
    ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".jp2", ".psd", ".svg",
    ".ico", ".tga", ".exr", ".hdr", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_WHITE = (255, 255, 255, 255)
_EXIF_ORIENTATION_TAG = 0x0112
# Images above this many pixels are refused: one such file (a "decompression bomb", or a scan at
# an absurd resolution) can take gigabytes of memory to decode. The config's
# max_image_megapixels raises it.
DEFAULT_MAX_PIXELS = 100_000_000
# catch_warnings changes process-wide state: our threads take turns around the (cheap) header read
_WARNINGS_LOCK = threading.Lock()
_PILLOW_LIMIT_PIXELS = re.compile(r"\((\d+) pixels\)")
_ORIENTATIONS_THAT_SWAP_AXES = frozenset({5, 6, 7, 8})


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, corrupt, not really an image, unreadable)."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_supported_image(path: PathLike) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def load_rgb(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `path` into an upright 8-bit RGB image (transparency composited on white).

    Raises UnreadableImage for anything that is not a complete, decodable image, or one of more
    than `max_pixels` pixels.
    """
    _reject_empty_file(path)
    try:
        with _open_within_limit(path, max_pixels) as opened:
            # Image.open only parses the header; a truncated or corrupt body is only noticed on a
            # full decode. We rely on Pillow's default LOAD_TRUNCATED_IMAGES=False and never change
            # that global: flipping it would silently turn half-downloaded files into grey blocks.
            opened.load()
            upright = _apply_exif_orientation(opened)
            return to_rgb(upright)
    except UnreadableImage:
        raise
    except Exception as exc:  # decoders raise many types on corrupt data; all mean "unreadable"
        raise UnreadableImage(path, _describe_decode_error(exc)) from exc


def probe_size(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), reading only the header. Cheap."""
    _reject_empty_file(path)
    try:
        with _open_within_limit(path, max_pixels) as opened:
            width, height = opened.size
            orientation = _exif_orientation(opened)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(path, _describe_decode_error(exc)) from exc
    if orientation in _ORIENTATIONS_THAT_SWAP_AXES:
        return height, width
    return width, height


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a person looking at the image would expect.

    Public because images that arrive as PIL objects (e.g. from the WebUI) need the same treatment.
    """
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        img = _high_bit_depth_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    if _has_transparency(img):
        return _composite_on_white(img)
    if img.mode == "RGB":
        return img
    # L, 1, CMYK, YCbCr, P without transparency: Pillow's own conversions are right for these.
    return img.convert("RGB")


def resize_and_crop(
    img: Image.Image,
    width: int,
    height: int,
    crop: str = "center",
    rng: Optional[random.Random] = None,
) -> Tuple[Image.Image, Tuple[int, int], Tuple[int, int]]:
    """Scale `img` so it covers width x height, then crop to exactly that size.

    Returns (image, crop_top_left, original_size):
      crop_top_left  (top, left) of the crop inside the *resized* image, in target pixels. SDXL
                     conditions on it, so it must describe the crop the model actually saw.
      original_size  (height, width) of the input before resizing (also an SDXL condition).
    """
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and rng is None:
        # An unseeded crop would make runs (and resumed runs) unreproducible.
        raise ValueError("crop='random' needs an rng (see lora_trainer.data.order.sample_rng)")
    original_width, original_height = img.size
    resized = _resize_to_cover(img, width, height)
    top, left = _crop_offsets(resized.size, width, height, crop, rng)
    cropped = resized.crop((left, top, left + width, top + height))
    return cropped, (top, left), (original_height, original_width)


def to_tensor(img: Image.Image):
    """RGB image -> float32 tensor [3, H, W] scaled to [-1, 1] (what the SD VAE encoder expects)."""
    import torch  # imported here so discovery/captions stay usable without loading torch

    if img.mode != "RGB":
        img = to_rgb(img)
    channels_first = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(channels_first).to(torch.float32).div_(127.5).sub_(1.0)


# ---- helpers -------------------------------------------------------------------------------------

def _reject_empty_file(path: PathLike) -> None:
    # Pillow's message for a 0-byte file ("cannot identify image file") hides the real cause,
    # which is usually an interrupted copy or download.
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise UnreadableImage(path, f"cannot read file ({exc.strerror or exc})") from exc
    if size == 0:
        raise UnreadableImage(path, "empty file (0 bytes)")


def _open_within_limit(path: PathLike, max_pixels: int) -> Image.Image:
    """Image.open (header only) that refuses more than `max_pixels` pixels with one clear reason,
    instead of Pillow's own DecompressionBombWarning on the console (or its error at twice its
    limit, whatever ours is)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _let_pillow_open(max_pixels)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as exc:
            found = _PILLOW_LIMIT_PIXELS.search(str(exc))
            raise UnreadableImage(path, too_many_pixels(int(found.group(1)) if found else None,
                                                        max_pixels)) from None
    width, height = opened.size
    if width * height > max_pixels:
        opened.close()
        raise UnreadableImage(path, too_many_pixels(width * height, max_pixels, (width, height)))
    return opened


def pixel_limit(megapixels: float) -> int:
    """The config's max_image_megapixels as the pixel count load_rgb / probe_size take."""
    return int(megapixels * 1_000_000)


def _let_pillow_open(max_pixels: int) -> None:
    # Pillow refuses images above twice its own global limit; a user who raised
    # max_image_megapixels means it, so Pillow's limit follows ours up (never down).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def too_many_pixels(pixels: Optional[int], max_pixels: int, size: Optional[Tuple[int, int]] = None) -> str:
    shape = f"{size[0]} x {size[1]} = " if size else ""
    amount = f"{shape}{pixels / 1e6:.1f} megapixels" if pixels else "more pixels than Pillow allows"
    return (f"image too large ({amount}; the limit is {max_pixels / 1e6:g} megapixels); "
            f"raise max_image_megapixels in the config if you trust this file")


def _describe_decode_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognisable image (corrupt, or the extension does not match the content)"
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated file ({message})"
    return f"{type(exc).__name__}: {message}"


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF should not make an otherwise fine image unusable
        return 1


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    # Phones store portrait photos as landscape pixels plus an EXIF "rotate me" flag; training on
    # the raw pixels would teach the model sideways people.
    try:
        transposed = ImageOps.exif_transpose(img)   # (None only when asked to work in place)
        return transposed if transposed is not None else img
    except Exception:  # malformed EXIF: keep the pixels as stored rather than reject the image
        return img.copy()


def _has_transparency(img: Image.Image) -> bool:
    # "transparency" in info covers palette PNG/GIF-style alpha and tRNS colour keys on L/RGB.
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _composite_on_white(img: Image.Image) -> Image.Image:
    # Dropping alpha would expose whatever colour the transparent pixels happen to store (often
    # black), so cut-out subjects would train on black backgrounds. White matches how such images
    # look in viewers and on most web pages.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values to 255, so nearly every pixel comes out white (or,
    # for "I" via some paths, wraps). Scale the full 16-bit range down instead. "I" (32-bit) only
    # comes from 16-bit greyscale PNGs among the formats we accept, so it is treated as 0..65535.
    values = np.asarray(img).astype(np.float64)
    scaled = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(scaled)


def _float_to_l(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if values.size and values.max() <= 1.0:  # float images are usually 0..1
        values = values * 255.0
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))


def _cover_size(size: Tuple[int, int], width: int, height: int) -> Tuple[int, int]:
    source_width, source_height = size
    scale = max(width / source_width, height / source_height)
    # max() guards against rounding leaving us one pixel short of the target.
    return max(width, round(source_width * scale)), max(height, round(source_height * scale))


def _resize_to_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    new_size = _cover_size(img.size, width, height)
    if new_size == img.size:
        return img
    # LANCZOS in Pillow widens its kernel when shrinking, so downscales are properly low-pass
    # filtered (no aliasing); reducing_gap first box-reduces huge photos by an integer factor,
    # which is much faster and visually identical.
    return img.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _crop_offsets(size: Tuple[int, int], width: int, height: int, crop: str,
                  rng: Optional[random.Random]) -> Tuple[int, int]:
    excess_x, excess_y = size[0] - width, size[1] - height
    if crop == "center":
        return excess_y // 2, excess_x // 2
    assert rng is not None, "crop='random' needs an rng"   # (checked by the caller)
    # Always draw both numbers so the RNG consumption does not depend on the image's aspect ratio.
    top = rng.randint(0, excess_y)
    left = rng.randint(0, excess_x)
    return top, left
