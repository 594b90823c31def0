"""Training config: schema, YAML loading/validation, CLI flags and docs (all from schema.py)."""
from .cli_args import add_config_arguments, overrides_from_args
from .load import (
    EFFECTIVE_CONFIG_NAME,
    REQUIRED_KEYS,
    ConfigChange,
    ConfigError,
    FieldSpec,
    ValueProblem,
    applies_to,
    cfg_warnings,
    coerce_value,
    config_diff,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    field_specs,
    load_config,
    resolve_path,
    write_effective_config,
)
from .schema import GROUPS, TrainConfig, field_meta, fields_of


def render_config_reference() -> str:
    # Imported on use: an eager import makes `python -m lora_trainer.config.docs` warn (runpy).
    from .docs import render_config_reference as render
    return render()

__all__ = [
    "EFFECTIVE_CONFIG_NAME", "GROUPS", "REQUIRED_KEYS", "ConfigChange", "ConfigError", "FieldSpec",
    "TrainConfig", "ValueProblem", "add_config_arguments", "applies_to", "cfg_warnings", "coerce_value",
    "config_diff", "config_from_dict", "config_hash", "config_to_dict", "dump_config", "field_meta",
    "field_specs", "fields_of", "load_config", "overrides_from_args", "render_config_reference",
    "resolve_path", "write_effective_config",
]
