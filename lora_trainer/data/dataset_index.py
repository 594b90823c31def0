"""What discovery produces and how it reports problems: `ImageRecord`, `DatasetIndex` (with the
manifest hash saved next to checkpoints) and `DataError`, plus the helpers that keep name lists in
its messages short. Kept apart from `discovery.py` so the caption readers and the folder walk can
raise and word errors the same way without importing the walk itself.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .captions import split_tags
from .images import SUPPORTED_EXTENSIONS

_MANIFEST_VERSION = b"lora_trainer.manifest.v1\n"
_NAMES_IN_A_MESSAGE = 10


class DataError(Exception):
    """The dataset cannot be used as configured. The message says what to fix.

    `problems` holds one line per offending file/row, for UIs that want to list them.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class ImageRecord:
    path: str            # absolute path of the image file
    rel_path: str        # posix path relative to train_data_dir: the record's stable identity
    caption: str
    repeats: int
    folder: str          # repeat folder name without its "N_" prefix, or "" outside such folders
    sha256: str          # of the file bytes: lets caches and resume detect a changed image
    width: int           # as displayed, i.e. after EXIF orientation
    height: int
    caption_source: str = "none"  # "csv" | "sidecar" | "none"


@dataclass
class DatasetIndex:
    root: str
    records: List[ImageRecord]
    warnings: List[str] = field(default_factory=list)
    metadata_path: Optional[str] = None  # the metadata.csv actually used, if any

    @property
    def num_images(self) -> int:
        return len(self.records)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: every image counted `repeats` times."""
        return sum(record.repeats for record in self.records)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """kohya-style `{"<repeats>_<folder>": {tag: count}}` (goes into ss_tag_frequency metadata).

        Images outside a repeat folder are grouped under the dataset folder's own name.
        """
        frequency: Dict[str, Counter] = defaultdict(Counter)
        for record in self.records:
            frequency[self.group_name(record)].update(split_tags(record.caption))
        return {key: dict(counts) for key, counts in sorted(frequency.items())}

    def group_name(self, record: ImageRecord) -> str:
        """kohya's name of the record's image folder, "<repeats>_<folder>": a name, never a path
        (it goes into LoRA metadata that people share)."""
        return f"{record.repeats}_{record.folder or Path(self.root).name or 'images'}"

    def manifest_hash(self) -> str:
        """Fingerprint of what is trained on: paths, image bytes, captions and repeats.

        Saved with checkpoints so a resume can tell the user their dataset changed under them.
        """
        entries = [[r.rel_path, r.sha256, r.caption, r.repeats]
                   for r in sorted(self.records, key=lambda r: r.rel_path)]
        # JSON gives every field an unambiguous encoding (no "a,b" + "c" == "a" + "b,c" collisions).
        encoded = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(_MANIFEST_VERSION + encoded).hexdigest()


# ---- message helpers -----------------------------------------------------------------------------

def _accepted_extensions() -> str:
    return ", ".join(sorted(SUPPORTED_EXTENSIONS))


def _some_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_IN_A_MESSAGE])
    hidden = len(names) - _NAMES_IN_A_MESSAGE
    return shown + (f" (and {hidden} more)" if hidden > 0 else "")
