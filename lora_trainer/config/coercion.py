"""What each TrainConfig field accepts and how one raw value becomes that field's type.

`FieldSpec`s are derived from the dataclass and its metadata in `schema.py`; `coerce_value` turns a
value from YAML, the CLI or the UI into the field's type, checking choices and ranges, and raises
`ValueProblem` with a message meant for the user. Loading whole files (`load.py`) and comparing
configs (`compare.py`) build on this.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from .schema import TrainConfig


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
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        specs.append(FieldSpec(f.name, kind, optional, default, f.metadata))
    return tuple(specs)


def field_specs() -> dict[str, FieldSpec]:
    """All fields in schema order, by name."""
    return {s.name: s for s in _specs_tuple()}


def _fresh_default(spec: FieldSpec):
    return list(spec.default) if spec.kind == "list" else spec.default


# ---------------------------------------------------------------------------------------------------
# Coercion of single values
# ---------------------------------------------------------------------------------------------------

class ValueProblem(ValueError):
    """One value that cannot be used; the message does not repeat the key."""


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


# Values earlier versions wrote (into every run's config.yaml and checkpoint) that now have another
# name: they keep loading, and a resume does not see them as a change.
LEGACY_VALUES = {"task_type": {"sd-lora": "sd"}}


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
        value = _check_choice(spec, LEGACY_VALUES.get(name, {}).get(str(value), str(value)))
    if spec.kind in ("int", "float"):
        value = _check_range(spec, value)
    return value
