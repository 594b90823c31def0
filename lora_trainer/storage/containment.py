"""The one place that decides whether a path stays inside a folder and whether a name is a name.

Every request-reachable path (the standalone app's fields and presets, the WebUI tab and its JSON
route) is checked with these helpers; the policies (which field may point where) live in
`lora_trainer/config/request_rules.py` and `lora_trainer/webui/guard.py`.

Containment compares *real* paths (symlinks resolved, `..` collapsed) of the path and of the
folder, so `runs/x/../../etc`, an absolute path, and a symlink inside the folder that points out
of it are all outside. A path that does not exist yet is resolved as far as it exists (what a
later mkdir/write would reach).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

# separators of every platform: a name typed on Windows ("..\\x") must not become a path on Linux
_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class PathRefused(ValueError):
    """A path or name a request may not use; the message names the field and the rule."""


def real(path) -> Path:
    """The path with `~` expanded, symlinks resolved and `..` collapsed (strict=False: a missing
    tail stays as written, resolved against what exists)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def is_inside(path, folder) -> bool:
    """True when `path` is `folder` or below it, after resolving both (symlinks included)."""
    try:
        real(path).relative_to(real(folder))
        return True
    except ValueError:
        return False


def inside_any(path, folders: Iterable) -> Optional[Path]:
    """The first of `folders` that contains `path`, or None."""
    for folder in folders:
        if folder is not None and is_inside(path, folder):
            return Path(folder)
    return None


def require_inside(path, folders: Iterable, what: str, hint: str = "") -> None:
    """Raise PathRefused unless `path` lies inside one of `folders`. The message names `what`
    (e.g. the field) and the folders, never the content of any file."""
    folders = [f for f in folders if f is not None]
    if inside_any(path, folders):
        return
    where = " or ".join(str(f) for f in folders) or "(no allowed folder)"
    raise PathRefused(f"{what}: {path} is outside the allowed folder{'s' if len(folders) > 1 else ''} "
                      f"{where}{'. ' + hint if hint else ''}")


def name_problem(value) -> Optional[str]:
    """Why `value` is not a plain file name (no folder parts, no `..`, not absolute), or None."""
    text = str(value or "")
    if not text.strip():
        return "is empty; give a name"
    if _SEPARATORS.search(text) or _DRIVE.match(text) or os.path.isabs(text):
        return f"must be a name, not a path (no '/', '\\' or drive): {text!r}"
    if text in (".", "..") or text.startswith(".."):
        return f"must be a name, not a relative path: {text!r}"
    if "\x00" in text:
        return "contains a NUL character"
    return None


def require_name(value, what: str) -> str:
    problem = name_problem(value)
    if problem:
        raise PathRefused(f"{what} {problem}")
    return str(value)


def child(folder, name: str, what: str, suffix: str = "") -> Path:
    """`folder/name+suffix` for a checked `name`, verified to stay inside `folder` (a symlink named
    like the child could still point elsewhere)."""
    require_name(name, what)
    path = Path(folder) / f"{name}{suffix}"
    require_inside(path, [folder], what)
    return path


__all__ = ["PathRefused", "child", "inside_any", "is_inside", "name_problem", "real", "require_inside",
           "require_name"]
