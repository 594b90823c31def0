"""Finding the LoRA a prompt tag names, the way the WebUI does inside its LoRA folder.

WebUI rules (extensions-builtin/Lora/networks.py):
- every sub-folder is scanned; folders whose path holds a hidden part ('/.') are skipped;
- the key is the file stem; the same stem in two folders collides and the last file scanned wins
  (folders and files in natural sort order);
- each file is also reachable by its alias, the `ss_output_name` metadata; an alias that is already
  taken (by a stem or another alias) becomes forbidden, and a forbidden name is looked up by stem only.

Only .safetensors files are ever loaded. .pt/.ckpt files are pickles, which can run code when
loaded; they are indexed only so that naming one gives a clear message instead of "not found".
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

SAFE_EXTENSION = ".safetensors"
PICKLE_EXTENSIONS = (".pt", ".ckpt")
# The WebUI seeds its forbidden aliases with these two names.
ALWAYS_FORBIDDEN_ALIASES = ("none", "addams")


class LoraNotFoundError(LookupError):
    """A tag names no usable LoRA file; the message names the tag and lists close names."""


@dataclass(frozen=True)
class LoraEntry:
    name: str              # file stem
    alias: str             # ss_output_name, else the stem
    path: Path
    metadata: dict

    @property
    def is_pickle(self) -> bool:
        return self.path.suffix.lower() in PICKLE_EXTENSIONS


def natural_key(text: str):
    """'lora10' after 'lora9', like the WebUI's natural_sort_key."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def walk_lora_files(folder: Path) -> list[Path]:
    """LoRA-like files under `folder`, in the WebUI's scan order, hidden folders skipped."""
    found = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        relative = Path(root).relative_to(folder).as_posix()
        # the WebUI tests the whole path for '/.'; only the part below the LoRA folder counts here,
        # so a LoRA folder that itself lives under a hidden folder still works
        if any(part.startswith(".") for part in relative.split("/") if part not in ("", ".")):
            continue
        for name in files:
            if Path(name).suffix.lower() in (SAFE_EXTENSION, *PICKLE_EXTENSIONS):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: (natural_key(p.parent.as_posix()), natural_key(p.name)))


class MetadataCache:
    """Safetensors headers by (path, mtime, size): a rescan reads only files that changed."""

    def __init__(self):
        self._entries: dict[Path, tuple[tuple, dict]] = {}

    def read(self, path: Path) -> dict:
        if path.suffix.lower() != SAFE_EXTENSION:
            return {}
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._entries.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception:  # a half-copied or foreign file: list it, but without an alias
            metadata = {}
        self._entries[path] = (stamp, metadata)
        return metadata


class LoraLibrary:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._metadata = MetadataCache()
        self.by_stem: dict[str, LoraEntry] = {}
        self.by_alias: dict[str, LoraEntry] = {}
        self.forbidden_aliases: set[str] = set()

    def scan(self) -> "LoraLibrary":
        """Rebuild the index; cheap, so it runs before every preview (new files appear at once)."""
        self.by_stem, self.by_alias = {}, {}
        self.forbidden_aliases = set(ALWAYS_FORBIDDEN_ALIASES)
        if not self.folder.is_dir():
            return self
        for path in walk_lora_files(self.folder):
            metadata = self._metadata.read(path)
            stem = path.stem
            entry = LoraEntry(stem, metadata.get("ss_output_name") or stem, path, metadata)
            if entry.alias in self.by_alias:
                self.forbidden_aliases.add(entry.alias.lower())
            self.by_stem[stem] = entry
            self.by_alias[stem] = entry
            self.by_alias[entry.alias] = entry
        return self

    def lookup(self, name: str) -> LoraEntry | None:
        if name.lower() in self.forbidden_aliases:
            return self.by_stem.get(name)
        return self.by_alias.get(name)

    def resolve(self, name: str, tag: str) -> LoraEntry:
        """The .safetensors file `name` refers to; LoraNotFoundError says why not."""
        entry = self.lookup(name)
        if entry is None:
            raise LoraNotFoundError(self._not_found_message(name, tag))
        if entry.is_pickle:
            raise LoraNotFoundError(
                f"{tag}: {entry.path} is a {entry.path.suffix} file, i.e. a Python pickle, which can "
                "run code when loaded; previews only load .safetensors. Convert it to .safetensors.")
        return entry

    def close_names(self, name: str, count: int = 5) -> list[str]:
        names = sorted(set(self.by_alias))
        by_lower = {n.lower(): n for n in names}
        matches = difflib.get_close_matches(name.lower(), list(by_lower), n=count, cutoff=0.5)
        return [by_lower[m] for m in matches]

    def _not_found_message(self, name: str, tag: str) -> str:
        where = (f"{self.folder} (sub-folders included)" if self.folder.is_dir()
                 else f"{self.folder}, which does not exist")
        message = (f"{tag}: no LoRA named '{name}' in {where}; a name is a file stem or a LoRA's "
                   "ss_output_name")
        if name.lower() in self.forbidden_aliases and name in self.by_alias:
            message += f" ('{name}' is the output name of several files, so only file stems work)"
        close = self.close_names(name)
        return message + (f". Close names: {', '.join(close)}" if close else "")
