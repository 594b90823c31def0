"""The header of a .safetensors file (tensor names, dtypes, shapes, byte ranges, metadata), read
without torch: config loading uses it to tell a model's family before anything heavy is imported."""
from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * (1 << 20)


class SafetensorsFormatError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, dict, int]:
    """(key -> {"dtype", "shape", "data_offsets"}, metadata, byte offset where the data starts)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            raise SafetensorsFormatError(f"{path}: too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"{path}: header length {length} is not plausible")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


def read_key_shapes(path: str | Path) -> tuple[dict, dict]:
    """(key -> shape tuple, metadata) without reading tensor data."""
    header, metadata, _ = read_header(path)
    try:
        return {key: tuple(int(s) for s in spec["shape"]) for key, spec in header.items()}, dict(metadata)
    except (KeyError, TypeError, ValueError) as e:
        raise SafetensorsFormatError(f"{path}: a tensor entry has no valid shape ({e})") from e
