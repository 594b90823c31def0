"""Preview images on disk: PNGs with WebUI infotext, grids and labelled weight sweeps."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from ..storage.atomic import atomic_write_bytes

LABEL_HEIGHT = 14


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def save_png(path: Path, image: Image.Image, parameters: str | None = None) -> Path:
    """Atomic write (the WebUI may list the folder at any time); `parameters` is the text chunk the
    WebUI's PNG Info tab reads."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def grid(images: list[Image.Image], columns: int | None = None,
         labels: list[str] | None = None) -> Image.Image:
    """Images in rows of `columns` (default: about square); cells fit the largest image, and a
    label strip goes above each cell when `labels` are given."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    label_h = LABEL_HEIGHT if labels else 0
    cell_h = max(im.height for im in images) + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(image, (x, y + label_h))
        if labels:
            draw.text((x + 2, y + 1), labels[i], fill="black")
    return sheet
