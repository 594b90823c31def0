"""Helpers shared by the test modules (a plain module: `conftest` names clash between folders)."""
from __future__ import annotations

from pathlib import Path

import yaml


def write_config(folder: Path, **values) -> Path:
    """A YAML config in `folder` (paths may be absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = dict(resolution=64, lora_rank=4, batch_size=2, epochs=2, learning_rate=1e-3,
                    output_dir=str(folder / "lora"), output_name="test_lora", save_steps=0,
                    save_precision="fp32", num_threads=1)
    defaults.update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in defaults.items()}))
    return path
