"""Which folders a request may make the trainer read and write: the rules of one serving mode.

A request (the tab's buttons, the WebUI's JSON route) is hostile input: it names files to read
(`train_data_dir`, `metadata_path`, `base_model`, ...) and folders to write (`output_dir`,
`run_dir`, `cache_dir`). `RequestRules` says where each may point; `check_values` refuses the
rest with one problem per field (a ConfigError, like any other bad setting). The standalone app
and the WebUI build different rules (docs/security.md); the containment test itself is
`lora_trainer.storage.containment`.

Raw values are checked *before* the config is built, so a refused path is never even tested for
existence (no probing of folders outside the allowed ones), and again on the built config, which
covers defaults (e.g. run_dir = runs/<output_name>).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from ..storage.containment import PathRefused, inside_any, name_problem, require_inside
from .load import ConfigError, config_to_dict, field_specs, resolve_path

WRITE_FIELDS = ("output_dir", "run_dir", "cache_dir")
NAME_FIELDS = ("output_name",)


def read_fields() -> tuple[str, ...]:
    """Every path field that is read, not written (from the schema, so a new one is covered)."""
    return tuple(name for name, spec in field_specs().items()
                 if spec.meta.get("path") and name not in WRITE_FIELDS)


@dataclass(frozen=True)
class RequestRules:
    """`write_roots[field]`: the folders a written path must lie in (a field not listed: any).
    `read_roots`: the folders read paths must lie in (None: any). `hint`s end the refusals (what
    to do instead, e.g. the WebUI flag that lifts the read rule)."""
    write_roots: Mapping[str, Sequence[Path]] = field(default_factory=dict)
    read_roots: Optional[Sequence[Path]] = None
    write_hint: str = ""
    read_hint: str = ""

    # ---- single paths ---------------------------------------------------------------------------
    def check_read(self, path, what: str) -> None:
        """Refuse a path this mode may not read (PathRefused)."""
        if self.read_roots is not None and path:
            require_inside(path, self.read_roots, what, self.read_hint)

    def check_write(self, path, what: str) -> None:
        roots = self.write_roots.get(what)
        if roots is not None and path:
            require_inside(path, roots, what, self.write_hint)

    def readable(self, path) -> bool:
        return self.read_roots is None or inside_any(path, self.read_roots) is not None

    # ---- a whole request ------------------------------------------------------------------------
    def problems(self, values: Mapping, base_dir, reads: bool = True) -> list[tuple[str, str]]:
        """(field, message) for every value these rules refuse; relative paths against base_dir.
        `reads=False`: names and written folders only."""
        out = []
        for key in NAME_FIELDS:
            if key in values and values[key] is not None:
                problem = name_problem(values[key])
                if problem:
                    out.append((key, problem))
        for key in (*(read_fields() if reads else ()), *WRITE_FIELDS):
            value = values.get(key)
            if not isinstance(value, str) or not value.strip():
                continue
            path = resolve_path(value.strip(), base_dir)
            try:
                (self.check_write if key in WRITE_FIELDS else self.check_read)(path, key)
            except PathRefused as refused:
                out.append((key, str(refused).split(": ", 1)[1]))
        return out

    def check_values(self, values: Mapping, base_dir, source: str, reads: bool = True) -> None:
        problems = self.problems(values, base_dir, reads)
        if problems:
            raise ConfigError(source, problems)

    def check_config(self, cfg, source: str, reads: bool = True) -> None:
        """The built config (defaults filled in, paths absolute). `reads=False` where the read
        paths came from the server, not the request (e.g. the WebUI's loaded checkpoint)."""
        self.check_values(config_to_dict(cfg), "/", source, reads)


def names_only() -> RequestRules:
    """The standalone app: the person at the page owns the machine (loopback, or --listen with a
    login), so any folder may be read and written; only names must be names."""
    return RequestRules()


def folders(paths: Iterable) -> list[Path]:
    return [Path(p) for p in paths if p]


__all__ = ["NAME_FIELDS", "RequestRules", "WRITE_FIELDS", "folders", "names_only", "read_fields"]
