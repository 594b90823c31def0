"""One `--kebab-case` CLI flag per TrainConfig field, generated from the schema.

Every flag defaults to None, meaning "not given": only flags the user typed override the YAML.
Values are checked with the same rules as the YAML loader, so `--learning-rate 2e-4`,
`--epochs 10.0` and `--optimizer ADAMW` behave exactly as they would in the file.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

from .load import FieldSpec, ValueProblem, coerce_value, describe_range, field_specs
from .schema import GROUPS

# Typed on the command line to set an optional field to null (e.g. `--max-grad-norm none`).
NULL_WORDS = ("none", "null")


class _Null:
    """Marks "the user asked for null"; plain None already means "flag not given"."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def _value_parser(spec: FieldSpec):
    def parse(text: str):
        if spec.optional and text.strip().lower() in NULL_WORDS + ("",):
            return NULL
        try:
            return coerce_value(spec.name, text)
        except ValueProblem as problem:
            raise argparse.ArgumentTypeError(str(problem)) from None
    parse.__name__ = spec.kind    # argparse names the type in some error messages
    return parse


def _help_text(spec: FieldSpec) -> str:
    parts = [spec.meta["help"]]
    if spec.meta.get("choices"):
        parts.append(f"Choices: {', '.join(spec.meta['choices'])}.")
    if describe_range(spec.meta):
        parts.append(f"Range: {describe_range(spec.meta)}.")
    if spec.optional:
        parts.append("'none' clears it.")
    parts.append(f"(default: {_default_text(spec)})")
    return " ".join(parts).replace("%", "%%")   # argparse %-formats help strings


def _default_text(spec: FieldSpec) -> str:
    if spec.default is None or spec.default == []:
        return "empty"
    if isinstance(spec.default, bool):
        return "true" if spec.default else "false"
    return str(spec.default)


def _metavar(spec: FieldSpec) -> str:
    if spec.meta.get("choices"):
        return "{" + ",".join(spec.meta["choices"]) + "}"
    if spec.meta.get("path"):
        return "PATH"
    return {"int": "N", "float": "X", "str": "TEXT", "list": "TEXT"}[spec.kind]


def _add_flag(group, spec: FieldSpec) -> None:
    common = dict(dest=spec.name, default=None, help=_help_text(spec))
    if spec.kind == "bool":
        group.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **common)
    elif spec.kind == "list":
        # Repeatable: `--preview-prompts "a cat" --preview-prompts "a dog"`.
        group.add_argument(spec.flag, action="append", type=str,
                           metavar=_metavar(spec), **common)
    else:
        group.add_argument(spec.flag, type=_value_parser(spec), metavar=_metavar(spec), **common)


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = ()) -> None:
    """Add one flag per config field, in an argument group per schema group.

    `exclude` skips fields whose flag the command defines differently itself.
    """
    excluded = set(exclude)
    specs = [s for s in field_specs().values() if s.name not in excluded]
    for group_name in GROUPS:
        in_group = [s for s in specs if s.meta["group"] == group_name]
        if not in_group:
            continue
        group = parser.add_argument_group(f"config: {group_name}",
                                          "override the YAML value of the same key")
        for spec in in_group:
            _add_flag(group, spec)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """{field: value} for the config flags the user actually gave."""
    overrides = {}
    for name in field_specs():
        value = getattr(ns, name, None)
        if value is not None:
            overrides[name] = None if value is NULL else value
    return overrides


__all__ = ["NULL", "add_config_arguments", "overrides_from_args"]
