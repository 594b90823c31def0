"""The part of a config that may leave the machine inside a LoRA file.

People upload LoRA files publicly; an absolute path there gives away user names and folder
layout. So the config embedded in a LoRA's metadata keeps what describes the training and drops
where things lived: input paths (dataset, base model, the LoRA it started from) are cut to their
last name, the way kohya writes `ss_dataset_dirs`, and output locations (output_dir, run_dir,
cache_dir) are dropped. The full local config stays in `<run_dir>/config.yaml`.
"""
from __future__ import annotations

import ntpath
import posixpath

from .coercion import field_specs
from .load import config_to_dict

# path kinds (schema "path") of the places a run writes to: nothing in them describes the LoRA
OUTPUT_PATH_KIND = "out"


def path_name(value: str) -> str:
    """The last component of a POSIX or Windows path ("C:\\Users\\x\\data\\" -> "data")."""
    trimmed = value.rstrip("/\\")
    return ntpath.basename(posixpath.basename(trimmed)) if trimmed else ""


def shareable_config(cfg) -> dict:
    """`config_to_dict(cfg)` without local paths: inputs by name only, output locations left out."""
    values = config_to_dict(cfg)
    public = {}
    for name, spec in field_specs().items():
        kind = spec.meta.get("path")
        if kind == OUTPUT_PATH_KIND:
            continue
        value = values[name]
        public[name] = path_name(value) if kind and isinstance(value, str) else value
    return public
