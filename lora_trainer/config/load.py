"""Load, validate, dump and compare TrainConfig.

Everything here is driven by the field metadata in `schema.py`, so a new field needs no code here.

Rules users rely on (they are documented in docs/config-reference.md):
  * relative paths in a YAML file are resolved against the YAML file's folder, never the cwd,
    so a config keeps working when the trainer is started from elsewhere;
  * paths given as CLI overrides are resolved against the cwd, like any shell argument;
  * every problem of a file is reported at once in one ConfigError, so fixing a config is one
    edit-run cycle instead of one per mistake.

Single values are checked in `coercion.py` and configs are compared in `compare.py`; their public
names are re-exported here, where the rest of the package imports them from.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from ..storage.atomic import atomic_write_text
from .coercion import (FieldSpec, ValueProblem, _fresh_default, _is_blank, coerce_value, describe_range,
                       field_specs)
from .compare import ConfigChange, config_diff, config_hash
from .schema import GROUPS, TrainConfig

# Keys without which no training can start, with the hint shown when one is missing.
REQUIRED_KEYS: dict[str, str] = {
    "train_data_dir": "set it to the folder with your training images "
                      "(e.g. train_data_dir: ./data/my_set; causal_lm: a .jsonl/.txt file or folder)",
    "base_model": "set it to the base checkpoint, a .safetensors file or a diffusers folder "
                  "(e.g. base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors; causal_lm: "
                  "a Hugging Face model folder)",
}

PATH_KINDS_THAT_MUST_EXIST = ("dir", "file", "dir_or_file")

# (base_model, base_model_config) -> the model's native training size, or None when it cannot be
# told. config/ reads no model files (backbones/ sits above it): the composition root passes the
# reader in (app/run_config.py), and an SD config without `resolution` trains at that size.
NativeResolution = Callable[[str, Optional[str]], Optional[int]]
EFFECTIVE_CONFIG_NAME = "config.yaml"


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

# LyCORIS options users bring along that this trainer does not have: say so instead of "unknown key"
UNSUPPORTED_KEYS = {
    "use_tucker": "Tucker decomposition is not supported: LoCon/LoHa/LoKr convolutions are trained with "
                  "the kernel inside the factors (no lora_mid / hada_t1 / hada_t2 / lokr_t2); remove the key",
    "use_cp": "Tucker (CP) decomposition is not supported; remove the key",
    "decompose_both": "LoKr's decompose_both is not supported: lokr_w1 is always a full matrix; remove the key",
    "factor": "did you mean 'lokr_factor'?",
    "algo": "did you mean 'adapter_type'?",
    "network_module": "did you mean 'adapter_type'?",
    "dora_wd": "did you mean 'dora'?",
}


def _unknown_key_problem(key) -> str:
    if str(key) in UNSUPPORTED_KEYS:
        return UNSUPPORTED_KEYS[str(key)]
    hint = difflib.get_close_matches(str(key), list(field_specs()), n=1, cutoff=0.6)
    if hint:
        return f"unknown key; did you mean {hint[0]!r}?"
    return "unknown key (all keys are listed in docs/config-reference.md)"


def applies_to(spec: FieldSpec, task_type: str) -> bool:
    """Whether a field is a setting of this task type (schema metadata `tasks`)."""
    return spec.meta.get("tasks") is None or task_type in spec.meta["tasks"]


def _task_type_of(raw: Mapping) -> str:
    try:
        return coerce_value("task_type", raw.get("task_type", field_specs()["task_type"].default))
    except ValueProblem:   # reported with the other problems; check the rest as the default task
        return field_specs()["task_type"].default


def _value_for(spec: FieldSpec, raw: Mapping, base_dir, required: Iterable[str], task_type: str = "sd"):
    """The checked value of one field; raises ValueProblem. A field of another task type is only
    coerced: its paths need not exist (an image setting left in a causal_lm config is ignored)."""
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
        if kind in PATH_KINDS_THAT_MUST_EXIST and applies_to(spec, task_type):
            problem = _missing_path_problem(kind, value)
            if problem:
                raise ValueProblem(problem)
    allowed = spec.meta.get("task_choices", {}).get(task_type)
    if allowed and value not in allowed:
        raise ValueProblem(f"{value!r} does not apply to task_type {task_type}; allowed: {', '.join(allowed)}")
    return value


def _file_order(problems: list[tuple[str, str]], raw: Mapping) -> list[tuple[str, str]]:
    # Report in the order the user wrote the keys; missing keys (not in the file) go last.
    position = {str(key): i for i, key in enumerate(raw)}
    return sorted(problems, key=lambda p: position.get(p[0], len(position)))


def config_from_dict(d: Mapping[str, Any], base_dir, source: str = "<ui>", *,
                     required: Iterable[str] = tuple(REQUIRED_KEYS),
                     native_resolution: Optional[NativeResolution] = None) -> TrainConfig:
    """Validate a plain dict (e.g. from the UI) into a TrainConfig; relative paths use base_dir.

    `required` lets the WebUI drop base_model (it trains on the loaded model). `native_resolution`
    gives an SD config that does not name `resolution` its model's native size (without it: the
    schema default); a run's config comes through app.run_config, which passes it.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(source, [("", f"the config must be a mapping of key: value, "
                                        f"got {type(d).__name__}")])
    specs = field_specs()
    required = tuple(required)
    problems = [(str(key), _unknown_key_problem(key)) for key in d if key not in specs]
    values = {}
    task_type = _task_type_of(d)
    for spec in specs.values():
        try:
            values[spec.name] = _value_for(spec, d, base_dir, required, task_type)
        except ValueProblem as problem:
            problems.append((spec.name, str(problem)))
    problems += [] if problems else _adapter_problems(values) + _precision_problems(values)
    if problems:
        raise ConfigError(source, _file_order(problems, d))
    if (native_resolution is not None and "resolution" not in d and values.get("base_model")
            and values["task_type"] == "sd"):
        native = native_resolution(values["base_model"], values.get("base_model_config"))
        if native is not None:
            values["resolution"] = native
    if values["run_dir"] is None:
        # Next to the YAML rather than in output_dir: the WebUI lists everything in models/Lora.
        values["run_dir"] = resolve_path(os.path.join("runs", values["output_name"]), base_dir)
    overlap = _output_and_run_dir_overlap(values["output_dir"], values["run_dir"])
    if overlap:
        raise ConfigError(source, [("run_dir", overlap)])
    return TrainConfig(**values)


def _adapter_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Adapter options that contradict each other (each problem names the field to change)."""
    problems = []
    if values["lokr_factor"] == 0:
        problems.append(("lokr_factor", "must be -1 (automatic) or a factor >= 1, got 0"))
    if values["lokr_factor"] != -1 and values["adapter_type"] != "lokr":
        problems.append(("lokr_factor", f"only applies to adapter_type: lokr (this is "
                                        f"{values['adapter_type']}); remove it or set adapter_type: lokr"))
    return problems


def _precision_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Half-precision base weights compute under autocast of the same half type: without it the
    fp32 LoRA outputs and fp32 inputs would meet fp16/bf16 weights in one layer."""
    base, mixed = values["base_dtype"], values["mixed_precision"]
    if base not in ("fp16", "bf16") or mixed == base:
        return []
    return [("base_dtype", f"{base} base weights need mixed_precision: {base} (it is {mixed!r}); "
                           f"set mixed_precision: {base}, or base_dtype: auto / fp32")]


def _is_within(inner: str, outer: str) -> bool:
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _output_and_run_dir_overlap(output_dir: str, run_dir: str) -> Optional[str]:
    """The run folder (checkpoints, logs) and output_dir (finished LoRAs) stay apart: the WebUI
    lists every .safetensors under its Lora folder as a LoRA, checkpoints included, and a fresh
    run (resume: false) moves the whole run folder aside, a LoRA inside it too."""
    if _is_within(run_dir, output_dir):
        return (f"{run_dir} is output_dir ({output_dir}) or inside it: the WebUI would list the "
                "run's checkpoints as LoRAs. Leave run_dir empty (runs/<output_name> next to the "
                "YAML) or pick a folder outside output_dir.")
    if _is_within(output_dir, run_dir):
        return (f"output_dir {output_dir} is inside the run folder {run_dir}: the finished LoRA "
                "belongs outside the run's training state (e.g. the WebUI's models/Lora).")
    return None


class DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load silently keeps the last of two equal keys; a config that says `epochs: 10` and
    later `epochs: 1` is a mistake to show, not to guess about."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list/mapping as a key is reported by the config check itself
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(f"key '{key}' appears twice, on line {first_line[key]} and on "
                                        f"line {line}; keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str):
    """`yaml.safe_load` that refuses duplicated keys (DuplicateKeyError names the key and lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml_mapping(path: Path, source: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", f"config file not found: {path.absolute()}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read the config file: {exc}")]) from None
    try:
        data = safe_load_unique(text)
    except DuplicateKeyError as exc:
        raise ConfigError(source, [("", str(exc))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if data is None:      # an empty file; the required keys will be reported
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"the file must contain key: value lines, "
                                        f"got a {type(data).__name__}")])
    return data


def load_config(path, overrides: Optional[Mapping[str, Any]] = None, *,
                native_resolution: Optional[NativeResolution] = None) -> TrainConfig:
    """Read a YAML config, apply overrides (e.g. CLI flags; they win) and validate everything
    (`native_resolution`: see config_from_dict)."""
    path = Path(os.path.expanduser(str(path)))
    source = str(path)
    raw = _read_yaml_mapping(path, source)
    merged = {**raw, **_absolutize_override_paths(overrides or {})}
    return config_from_dict(merged, base_dir=path.absolute().parent, source=source,
                            native_resolution=native_resolution)


def cfg_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are valid but probably not what the user meant."""
    warnings = [f"{name} is a setting of task_type {' / '.join(spec.meta['tasks'])}; this is a "
                f"{cfg.task_type} run, so it is ignored."
                for name, spec in field_specs().items()
                if not applies_to(spec, cfg.task_type) and getattr(cfg, name) != _fresh_default(spec)]
    if cfg.preview_every_n_steps > 0 and not cfg.preview_prompts:
        warnings.append("preview_every_n_steps is set but preview_prompts is empty; no previews.")
    if cfg.task_type != "sd":   # the rest are about SD-only settings, already reported as ignored
        return warnings
    if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:
        warnings.append("text_encoder_lr is set but train_text_encoder is false; it has no effect.")
    if ((cfg.conv_rank is not None or cfg.conv_alpha is not None) and cfg.target_modules != "locon"
            and cfg.adapter_type != "locon"):
        warnings.append("conv_rank/conv_alpha only apply with target_modules: locon (or adapter_type: "
                        "locon); they are ignored.")
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
    folder = Path(run_dir) if run_dir is not None else cfg.run_path
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / EFFECTIVE_CONFIG_NAME
    atomic_write_text(target, dump_config(cfg))
    return target


__all__ = [
    "ConfigChange", "ConfigError", "EFFECTIVE_CONFIG_NAME", "FieldSpec", "GROUPS", "NativeResolution",
    "REQUIRED_KEYS", "ValueProblem", "applies_to", "cfg_warnings", "coerce_value", "config_diff",
    "config_from_dict", "config_hash", "config_to_dict", "describe_range", "dump_config", "field_specs",
    "load_config", "resolve_path", "write_effective_config",
]
