"""Content hashes of files, read in 1 MiB chunks (a dataset image or a checkpoint tensor file may
be large; a whole-file read would hold it in memory twice)."""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
