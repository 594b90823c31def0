"""Presets of the Train LoRA tab: YAML files in ONE presets folder, addressed by name.

The preset box is request input: a path there would let any caller of the Save button write a
YAML file anywhere (e.g. a `webui-user.sh` with a `$(...)` value: code at the next start) and the
Load button read any file and show it back. So a preset is a *name* (`my_lora` or `my_lora.yaml`;
no folder parts, no `..`, no other suffix), and a load error says where the file is broken, never
what it contains.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError
from ..storage.containment import PathRefused, child, name_problem

SUFFIXES = (".yaml", ".yml")


def preset_file(folder, name: str) -> Path:
    """`<folder>/<name>.yaml` (or .yml if the name says so); PathRefused for anything else."""
    text = (name or "").strip()
    problem = name_problem(text)
    if problem:
        raise PathRefused(f"Preset name {problem}. Give a name like my_lora; presets live in {folder}")
    suffix = Path(text).suffix
    if suffix and suffix.lower() not in SUFFIXES:
        raise PathRefused(f"Preset name: a preset is a .yaml file; {text!r} ends in {suffix!r}")
    stem = text[: -len(suffix)] if suffix else text
    return child(folder, stem, "Preset name", suffix.lower() if suffix else ".yaml")


def yaml_syntax_problem(path: Path) -> str | None:
    """Where the file is not valid YAML (line and column), without the text PyYAML would quote."""
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "the file is not UTF-8 text"
    except OSError as error:
        return f"cannot read the file ({error.strerror or type(error).__name__})"
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"not valid YAML{where}"
    return None


def load_preset(path: Path, required=None):
    """The preset's TrainConfig (`required`: the keys this tab needs, e.g. no base_model in the
    WebUI); ConfigError whose messages quote no file content for syntax errors."""
    from .runs import load_config_file

    syntax = yaml_syntax_problem(path)
    if syntax:
        raise ConfigError(path.name, [("", syntax)])
    return load_config_file(path, required)


__all__ = ["SUFFIXES", "load_preset", "preset_file", "yaml_syntax_problem"]
