"""Load, validate, dump and compare TrainConfig.

Everything here is driven by the field metadata in `schema.py`, so a new field needs no code here.

Rules users rely on (they are documented in docs/config-reference.md):
  * relative paths in a YAML file are resolved against the YAML file's folder, never the cwd,
    so a config keeps working when the trainer is started from elsewhere;
  * paths given as CLI overrides are resolved against the cwd, like any shell argument;
  * every problem of a file is reported at once in one ConfigError, so fixing a config is one
    edit-run cycle instead of one per mistake.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from ..storage.atomic import atomic_write_text
from .schema import GROUPS, TrainConfig

# Keys without which no training can start, with the hint shown when one is missing.
REQUIRED_KEYS: dict[str, str] = {
    "train_data_dir": "set it to the folder with your training images "
                      "(e.g. train_data_dir: ./data/my_set)",
    "base_model": "set it to the base checkpoint, a .safetensors file or a diffusers folder "
                  "(e.g. base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors)",
}

PATH_KINDS_THAT_MUST_EXIST = ("dir", "file", "dir_or_file")
EFFECTIVE_CONFIG_NAME = "config.yaml"


# ---------------------------------------------------------------------------------------------------
# Field descriptions derived from the dataclass
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    """What the loader, the CLI and the docs need to know about one TrainConfig field."""
    name: str
    kind: str            # "str" | "int" | "float" | "bool" | "list" (list of strings)
    optional: bool       # accepts null / empty
    default: Any
    meta: Mapping[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_KIND_OF_TYPE = {str: "str", int: "int", float: "float", bool: "bool", list: "list"}


def _kind_and_optional(annotation) -> tuple[str, bool]:
    # schema.py uses `from __future__ import annotations`; get_type_hints gives real types back.
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _KIND_OF_TYPE[typing.get_origin(inner) or inner], True
    return _KIND_OF_TYPE[typing.get_origin(annotation) or annotation], False


@functools.lru_cache(maxsize=None)
def _specs_tuple() -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in dataclasses.fields(TrainConfig):
        kind, optional = _kind_and_optional(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        specs.append(FieldSpec(f.name, kind, optional, default, f.metadata))
    return tuple(specs)


def field_specs() -> dict[str, FieldSpec]:
    """All fields in schema order, by name."""
    return {s.name: s for s in _specs_tuple()}


def _fresh_default(spec: FieldSpec):
    return list(spec.default) if spec.kind == "list" else spec.default


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """All problems of one config source. `problems` is a list of (key, message); key "" = whole file."""

    def __init__(self, source: str, problems: Iterable[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''} in the config:"
        lines = [f"  - {key}: {msg}" if key else f"  - {msg}" for key, msg in self.problems]
        return "\n".join([head, *lines])


class ValueProblem(ValueError):
    """One value that cannot be used; the message does not repeat the key."""


# ---------------------------------------------------------------------------------------------------
# Coercion of single values
# ---------------------------------------------------------------------------------------------------

def _show(value) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    # Strings arrive from the UI and from quoted YAML; YAML's own true/false are already bools.
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise ValueProblem(f"{_show(value)} is not a boolean (expected true or false)")


def _to_float(value) -> float:
    # bool is an int subclass; `learning_rate: true` is a mistake, not 1.0.
    if isinstance(value, bool):
        raise ValueProblem(f"{_show(value)} is not a number (expected float)")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML 1.1 reads `2e-4` (no dot) as a string, so numeric strings must work.
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueProblem(f"{_show(value)} is not a number (expected float)") from None
    else:
        raise ValueProblem(f"{_show(value)} is not a number (expected float)")
    if not math.isfinite(number):
        raise ValueProblem(f"{_show(value)} is not a finite number (expected float)")
    return number


def _to_int(value) -> int:
    if isinstance(value, bool):
        raise ValueProblem(f"{_show(value)} is not a whole number (expected int)")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = _to_float(value)
    except ValueProblem:
        raise ValueProblem(f"{_show(value)} is not a whole number (expected int)") from None
    # `epochs: 10.0` (or a UI number box) is fine; `epochs: 2.5` is not.
    if not number.is_integer():
        raise ValueProblem(f"{_show(value)} is not a whole number (expected int)")
    return int(number)


def _to_str(value) -> str:
    if isinstance(value, bool):
        # Unquoted yes/no/on/off become booleans in YAML; the fix is quoting.
        raise ValueProblem(f"{_show(value)} is not text (expected string; put it in quotes)")
    if isinstance(value, (int, float)):
        return str(value)   # e.g. `output_name: 2024`
    if isinstance(value, str):
        return value
    raise ValueProblem(f"{_show(value)} is not text (expected string)")


def _to_str_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if not isinstance(value, list):
        raise ValueProblem(f"{_show(value)} is not a list of strings (expected a string or a list)")
    if not all(isinstance(item, str) for item in value):
        raise ValueProblem(f"{_show(value)}: every entry must be a string (put prompts in quotes)")
    # Blank lines come from UI text boxes and mean nothing.
    return [item for item in value if item.strip()]


def _to_float_list(value) -> list:
    """A list of numbers; a string is split on commas ("0, 0.4, 1" from a UI text box)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif not isinstance(value, list):
        value = [value]
    return [_to_float(item) for item in value]


_CONVERTERS = {"bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str,
               "list": _to_str_list}


def _check_choice(spec: FieldSpec, value: str) -> str:
    choices = spec.meta.get("choices")
    if not choices or value in choices:
        return value
    by_lower = {c.lower(): c for c in choices}
    if value.strip().lower() in by_lower:          # `FP16` means fp16
        return by_lower[value.strip().lower()]
    hint = difflib.get_close_matches(value, choices, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueProblem(f"{_show(value)} is not allowed; allowed values: "
                       f"{', '.join(choices)}{suggestion}")


def _yaml_bool_as_choice(spec: FieldSpec, value: bool):
    # YAML 1.1 turns an unquoted `mixed_precision: no` into False; give the word back when it is
    # one of the choices, since that is obviously what the user wrote.
    words = ("yes", "true", "on") if value else ("no", "false", "off")
    matches = [c for c in spec.meta.get("choices") or () if c.lower() in words]
    return matches[0] if matches else value


def describe_range(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def _check_range(spec: FieldSpec, value):
    low, high = spec.meta.get("min"), spec.meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueProblem(f"{_show(value)} is out of range (allowed: {describe_range(spec.meta)})")
    return value


def coerce_value(name: str, raw):
    """Turn one raw value (YAML, CLI or UI) into the field's type, or raise ValueProblem.

    Checks type, choices and range; not paths (they need a base folder) nor required keys.
    """
    spec = field_specs()[name]
    if spec.kind == "list":
        return _to_float_list(raw) if spec.meta.get("item") == "float" else _to_str_list(raw)
    if _is_blank(raw) and spec.optional:
        return None
    if raw is None:
        raise ValueProblem(f"is empty; give a value or delete the line to use the default "
                           f"({_show(spec.default)})")
    if spec.kind == "str" and isinstance(raw, bool):
        raw = _yaml_bool_as_choice(spec, raw)
    value = _CONVERTERS[spec.kind](raw)
    if spec.kind == "str":
        value = _check_choice(spec, value)
    if spec.kind in ("int", "float"):
        value = _check_range(spec, value)
    return value


# ---------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------

def resolve_path(value: str, base_dir) -> str:
    """`~` expanded, relative paths joined to base_dir, normalised; the result is absolute."""
    expanded = os.path.expanduser(value)
    if not os.path.isabs(expanded):
        expanded = os.path.join(os.path.abspath(base_dir), expanded)
    return os.path.normpath(expanded)


def _missing_path_problem(kind: str, path: str) -> Optional[str]:
    if kind == "dir" and os.path.isfile(path):
        return f"expected a folder but this is a file: {path}"
    if kind == "file" and os.path.isdir(path):
        return f"expected a file but this is a folder: {path}"
    if not os.path.exists(path):
        return f"path does not exist: {path}"
    return None


def _absolutize_override_paths(overrides: Mapping[str, Any]) -> dict:
    # Paths typed on the command line are relative to the shell's cwd, not to the YAML.
    specs = field_specs()
    result = dict(overrides)
    for key, value in overrides.items():
        if key in specs and specs[key].meta.get("path") and isinstance(value, str) and value.strip():
            result[key] = resolve_path(value, os.getcwd())
    return result


# ---------------------------------------------------------------------------------------------------
# Building a TrainConfig
# ---------------------------------------------------------------------------------------------------

def _unknown_key_problem(key) -> str:
    hint = difflib.get_close_matches(str(key), list(field_specs()), n=1, cutoff=0.6)
    if hint:
        return f"unknown key; did you mean {hint[0]!r}?"
    return "unknown key (all keys are listed in docs/config-reference.md)"


def _value_for(spec: FieldSpec, raw: Mapping, base_dir, required: Iterable[str]):
    """The checked value of one field; raises ValueProblem."""
    if spec.name in required and _is_blank(raw.get(spec.name)):
        raise ValueProblem(f"missing; {REQUIRED_KEYS.get(spec.name, 'give it a value')}")
    kind = spec.meta.get("path")
    if spec.name not in raw:
        default = _fresh_default(spec)
        # a default path (output_dir: output) is relative to the YAML too, and is written resolved
        # into the run's config.yaml so resuming from that file lands in the same place
        return resolve_path(default, base_dir) if kind and default else default
    value = coerce_value(spec.name, raw[spec.name])
    if kind and value is not None:
        if not value.strip():
            raise ValueProblem("is empty; give a path")
        value = resolve_path(value, base_dir)
        if kind in PATH_KINDS_THAT_MUST_EXIST:
            problem = _missing_path_problem(kind, value)
            if problem:
                raise ValueProblem(problem)
    return value


def _file_order(problems: list[tuple[str, str]], raw: Mapping) -> list[tuple[str, str]]:
    # Report in the order the user wrote the keys; missing keys (not in the file) go last.
    position = {str(key): i for i, key in enumerate(raw)}
    return sorted(problems, key=lambda p: position.get(p[0], len(position)))


def config_from_dict(d: Mapping[str, Any], base_dir, source: str = "<ui>", *,
                     required: Iterable[str] = tuple(REQUIRED_KEYS)) -> TrainConfig:
    """Validate a plain dict (e.g. from the UI) into a TrainConfig; relative paths use base_dir.

    `required` lets the WebUI drop base_model (it trains on the loaded model).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(source, [("", f"the config must be a mapping of key: value, "
                                        f"got {type(d).__name__}")])
    specs = field_specs()
    required = tuple(required)
    problems = [(str(key), _unknown_key_problem(key)) for key in d if key not in specs]
    values = {}
    for spec in specs.values():
        try:
            values[spec.name] = _value_for(spec, d, base_dir, required)
        except ValueProblem as problem:
            problems.append((spec.name, str(problem)))
    if problems:
        raise ConfigError(source, _file_order(problems, d))
    if values["run_dir"] is None:
        # Next to the YAML rather than in output_dir: the WebUI lists everything in models/Lora.
        values["run_dir"] = resolve_path(os.path.join("runs", values["output_name"]), base_dir)
    return TrainConfig(**values)


def _read_yaml_mapping(path: Path, source: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", f"config file not found: {path.absolute()}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read the config file: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if data is None:      # an empty file; the required keys will be reported
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"the file must contain key: value lines, "
                                        f"got a {type(data).__name__}")])
    return data


def load_config(path, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Read a YAML config, apply overrides (e.g. CLI flags; they win) and validate everything."""
    path = Path(os.path.expanduser(str(path)))
    source = str(path)
    raw = _read_yaml_mapping(path, source)
    merged = {**raw, **_absolutize_override_paths(overrides or {})}
    return config_from_dict(merged, base_dir=path.absolute().parent, source=source)


def cfg_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are valid but probably not what the user meant."""
    warnings = []
    if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:
        warnings.append("text_encoder_lr is set but train_text_encoder is false; it has no effect.")
    if (cfg.conv_rank is not None or cfg.conv_alpha is not None) and cfg.target_modules != "locon":
        warnings.append("conv_rank/conv_alpha only apply with target_modules: locon; they are ignored.")
    if cfg.preview_every_n_steps > 0 and not cfg.preview_prompts:
        warnings.append("preview_every_n_steps is set but preview_prompts is empty; no previews.")
    return warnings


# ---------------------------------------------------------------------------------------------------
# Dumping
# ---------------------------------------------------------------------------------------------------

def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict in schema order (lists copied, so editing it leaves cfg alone)."""
    return {name: _copy(getattr(cfg, name)) for name in field_specs()}


def _copy(value):
    return list(value) if isinstance(value, list) else value


def _yaml_line(key: str, value) -> str:
    # One key at a time keeps schema order; a huge width stops long prompts being folded.
    return yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=10**9)


def dump_config(cfg: TrainConfig) -> str:
    """YAML text that load_config reads back to an equal config; grouped with comment headers."""
    values = config_to_dict(cfg)
    parts = ["# lora_trainer config (keys: docs/config-reference.md)\n"]
    current_group = None
    for name, spec in field_specs().items():
        if spec.meta["group"] != current_group:
            current_group = spec.meta["group"]
            parts.append(f"\n# ---- {current_group} ----\n")
        parts.append(_yaml_line(name, values[name]))
    return "".join(parts)


def write_effective_config(cfg: TrainConfig, run_dir=None) -> Path:
    """Write `<run_dir>/config.yaml` (the config a run really used); returns its path."""
    folder = Path(run_dir if run_dir is not None else cfg.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / EFFECTIVE_CONFIG_NAME
    atomic_write_text(target, dump_config(cfg))
    return target


# ---------------------------------------------------------------------------------------------------
# Comparing configs (resume checks)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any
    resume: str     # "free" | "force" | "fixed" (schema metadata)


def _comparable(name: str, raw):
    # Old configs may hold uncoerced values (`2e-4` as text); compare what they mean.
    try:
        return coerce_value(name, raw)
    except ValueProblem:
        return raw


def config_diff(old: Mapping[str, Any], new: TrainConfig) -> list[ConfigChange]:
    """Fields whose value differs between a run's saved config (dict) and the new config.

    A key missing from `old` (written before the field existed) counts as its default.
    Keys in `old` that the schema no longer has are ignored.
    """
    changes = []
    for name, spec in field_specs().items():
        before = _comparable(name, old[name]) if name in old else _fresh_default(spec)
        after = getattr(new, name)
        if before != after:
            changes.append(ConfigChange(name, before, after, spec.meta["resume"]))
    return changes


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the canonical JSON of the fields that matter for resuming (resume != "free")."""
    relevant = {name: getattr(cfg, name) for name, spec in field_specs().items()
                if spec.meta["resume"] != "free"}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


__all__ = [
    "ConfigChange", "ConfigError", "EFFECTIVE_CONFIG_NAME", "FieldSpec", "GROUPS", "REQUIRED_KEYS",
    "ValueProblem", "cfg_warnings", "coerce_value", "config_diff", "config_from_dict", "config_hash",
    "config_to_dict", "describe_range", "dump_config", "field_specs", "load_config", "resolve_path",
    "write_effective_config",
]
