"""Comparing configs for resume checks: which fields changed since a run's saved config
(`config_diff`, each change tagged with the field's `resume` rule from the schema) and a hash of the
fields that matter for resuming (`config_hash`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .coercion import ValueProblem, _fresh_default, coerce_value, field_specs
from .schema import TrainConfig


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
