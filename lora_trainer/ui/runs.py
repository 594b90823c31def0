"""The runs list: run folders under a runs folder, each with its newest valid checkpoint, and the
config a Resume starts (the run's own `config.yaml`, which records everything it used)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..app.run_config import load_run_config, run_config_from_dict
from ..config import EFFECTIVE_CONFIG_NAME
from ..storage.checkpoints import CHECKPOINTS_DIRNAME, CheckpointStore

COLUMNS = ["Run", "Step", "Loss", "Saved"]


def _blank_path_defaults() -> frozenset:
    """Path fields whose default is "" (not None): a run's config.yaml writes them as ''."""
    from ..config.load import field_specs

    return frozenset(name for name, spec in field_specs().items()
                     if spec.meta.get("path") and spec.default == "")


_BLANK_MEANS_DEFAULT = _blank_path_defaults()


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    step: Optional[int]             # newest valid checkpoint, None when there is none
    loss: Optional[float]
    saved: Optional[float]          # unix time of that checkpoint
    resumable: bool                 # has a config.yaml
    note: str = ""                  # e.g. skipped (corrupt) newer checkpoints

    def row(self) -> list:
        return [self.name,
                "-" if self.step is None else self.step,
                "-" if self.loss is None else f"{self.loss:.5f}",
                "-" if self.saved is None else time.strftime("%m-%d %H:%M:%S", time.localtime(self.saved))]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / EFFECTIVE_CONFIG_NAME).is_file()
                              or (path / CHECKPOINTS_DIRNAME).is_dir())


def describe_run(path: Path) -> RunInfo:
    path = Path(path)
    info, warnings = CheckpointStore(path).latest_valid()
    note = f"{len(warnings)} newer checkpoint(s) unusable" if warnings else ""
    return RunInfo(name=path.name, path=path, step=info.step if info else None,
                   loss=info.loss if info else None, saved=info.created if info else None,
                   resumable=(path / EFFECTIVE_CONFIG_NAME).is_file(), note=note)


def find_runs(roots: Iterable) -> list[RunInfo]:
    """Run folders directly under each root (a root that is itself a run counts too), newest first.
    Missing roots are skipped."""
    seen, runs = set(), []
    for root in roots:
        if not root:
            continue
        root = Path(root).expanduser()
        candidates = [root] if is_run_dir(root) else (
            sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
        for path in candidates:
            resolved = path.resolve()
            if resolved in seen or not is_run_dir(path):
                continue
            seen.add(resolved)
            runs.append(describe_run(path))
    runs.sort(key=lambda r: (r.saved or _mtime(r.path)), reverse=True)
    return runs


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def table(runs: list[RunInfo]) -> list[list]:
    return [r.row() for r in runs]


def resume_config(run_dir, required: Optional[Iterable[str]] = None):
    """The config a run was started with, set to resume (a `resume: false` run would otherwise be
    moved aside and started again). Raises ConfigError with every problem. `required`: the keys
    that must be set (default: the config's own; the WebUI drops base_model, it trains on the
    loaded model)."""
    cfg = load_config_file(Path(run_dir) / EFFECTIVE_CONFIG_NAME, required)
    return dataclasses.replace(cfg, resume=True) if not cfg.resume else cfg


def load_config_file(path, required: Optional[Iterable[str]] = None):
    """`load_run_config(path)`, or with other `required` keys than the config's own (a run's
    config.yaml or a preset written inside the WebUI, where base_model is optional)."""
    if required is None:
        return load_run_config(path)
    from ..config.load import _read_yaml_mapping

    path = Path(path)
    raw = _read_yaml_mapping(path, str(path))
    # a blank path that is not required here was the field's default when the file was written
    # (the WebUI's runs record `base_model: ''`: they train the loaded model); read back as
    # given it would be refused as an "empty path" and the run could never be resumed
    raw = {k: v for k, v in raw.items()
           if not (k not in required and k in _BLANK_MEANS_DEFAULT and isinstance(v, str) and not v.strip())}
    return run_config_from_dict(raw, base_dir=path.absolute().parent, source=str(path),
                                required=tuple(required))
