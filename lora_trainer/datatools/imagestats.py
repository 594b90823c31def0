"""Per-image numbers for the data check, from one cheap decode: a perceptual hash, a sharpness
score and a thumbnail. numpy + Pillow only (no OpenCV / scipy)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..data.images import load_rgb, to_rgb

HASH_SIZE = 8           # 8x8 = 64-bit perceptual hash
_HASH_SOURCE_SIZE = 32  # pHash: DCT of a 32x32 grayscale, keep the 8x8 lowest frequencies
THUMBNAIL_SIDE = 112


@dataclass
class ImageStats:
    phash: int               # 64-bit perceptual hash; near-identical images differ in few bits
    sharpness: float         # variance of the Laplacian at the working size; low means blurry
    thumbnail_jpeg: bytes    # small JPEG for the HTML report


def analyse_image(path: str, working_side: int) -> ImageStats:
    """Decode `path` once (at reduced size where the format allows) and measure it.

    Sharpness is measured with the short side scaled down to `working_side` (the training
    resolution): that is the detail the model sees, so a large sharp photo is not called blurry
    for having little detail per pixel, and a blur that survives the downscale is still caught.
    Smaller images are measured as they are. Raises UnreadableImage if the file cannot be decoded.
    """
    image = _decode_small(path, working_side)
    gray = _gray_at_short_side(image, working_side)
    return ImageStats(phash=perceptual_hash(gray), sharpness=laplacian_variance(gray),
                      thumbnail_jpeg=_thumbnail(image))


def _decode_small(path: str, working_side: int) -> Image.Image:
    try:
        with Image.open(path) as opened:
            # JPEG can decode at 1/2..1/8 scale directly (much faster for big photos); a truncated
            # file still fails here, because every scan must be read to the end either way.
            opened.draft("RGB", (working_side, working_side))
            opened.load()
            transposed = ImageOps.exif_transpose(opened)   # (None only when asked to work in place)
            return to_rgb(transposed if transposed is not None else opened)
    except Exception:
        # Let the training loader's decoder say why: it raises UnreadableImage with the same
        # message discovery would give (or succeeds, if only our fast path tripped).
        return load_rgb(path)


def _gray_at_short_side(image: Image.Image, side: int) -> np.ndarray:
    gray = image.convert("L")
    scale = side / min(gray.size)
    if scale < 1:
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(size, Image.Resampling.BOX)  # area average: no ringing, no aliasing
    return np.asarray(gray, dtype=np.float64)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (0..255 grayscale): the classic blur measure.

    Edges and fine texture give large second derivatives; a blurred image has none.
    """
    if min(gray.shape) < 3:
        return 0.0
    centre = gray[1:-1, 1:-1]
    laplacian = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]) - 4 * centre
    return float(laplacian.var())


def perceptual_hash(gray: np.ndarray) -> int:
    """pHash: signs of the 8x8 lowest DCT frequencies of a 32x32 grayscale versus their median.

    Survives resizing, re-encoding and mild colour changes, unlike a file hash.
    """
    small = Image.fromarray(gray.astype(np.uint8)).resize(
        (_HASH_SOURCE_SIZE, _HASH_SOURCE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float64)
    basis = _dct_matrix(_HASH_SOURCE_SIZE)
    low = (basis @ pixels @ basis.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    # The DC term (overall brightness) is excluded from the median so it cannot skew it.
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: rows are frequencies."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


def _thumbnail(image: Image.Image) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=70)
    return buffer.getvalue()
