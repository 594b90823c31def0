"""Crash-safe file writes.

Every file is written to a hidden temp file in the SAME folder (so os.replace is a rename on
one filesystem, which is atomic), flushed and fsynced, renamed over the target, and then the
folder itself is fsynced so the rename survives a power cut. A reader therefore sees either the
complete old file or the complete new one, never a half-written file.

Temp names start with "." and end with ".tmp": the WebUI lists "*.safetensors", so it never
offers a half-written LoRA.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .processes import pid_is_running

if TYPE_CHECKING:
    import torch


TEMP_SUFFIX = ".tmp"
# temp_path_for's names: ".<target name>.<pid>-<8 hex>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")

# EDQUOT (quota exceeded) is "disk full" from the user's point of view; it does not exist on Windows.
_DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)

# Some filesystems (and Windows) cannot fsync a directory; that loses durability, not correctness.
_DIR_FSYNC_UNSUPPORTED = frozenset(
    e for e in (errno.EINVAL, getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None))
    if e is not None)


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing `path`; the previous file is untouched."""

    def __init__(self, path: os.PathLike | str, message: Optional[str] = None):
        self.path = Path(path)
        super().__init__(message or (
            f"Could not write {self.path}: the disk is full. "
            f"The previous version of the file (if any) is intact. Free some space and try again."))
        # Keep errno so callers that only know OSError can still recognise the condition.
        self.errno = errno.ENOSPC


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFullError) or (
        isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS)


def temp_path_for(path: os.PathLike | str) -> Path:
    """A unique hidden sibling of `path` (pid + random token: two writers never collide)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(path: os.PathLike | str) -> None:
    """Make renames/creations inside folder `path` durable."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(os.fspath(path), flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_file_synced(path: os.PathLike | str, data: bytes) -> None:
    """Create `path` (must not exist), write all of `data`, fsync. Not atomic on its own:
    use it inside a temp folder that is renamed afterwards, or via atomic_write_bytes."""
    # O_EXCL: never clobber a file we did not create. Mode 0o666 lets the umask decide.
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Replace `path` with `data` atomically. On failure the old file is untouched and no temp
    file is left; ENOSPC/EDQUOT become DiskFullError(path)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        write_file_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException as exc:  # also KeyboardInterrupt: never leave the temp behind
        _remove_quietly(tmp)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from exc
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        # The new file is already in place; only its durability is in doubt.
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """The project's one JSON encoding (UTF-8, indented, trailing newline)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: os.PathLike | str, obj: Any) -> None:
    # Serialise before touching the disk, so a non-JSON-able object cannot cost the old file.
    atomic_write_bytes(path, json_bytes(obj))


def safetensors_bytes(tensors: Mapping[str, "torch.Tensor"],
                      metadata: Optional[Mapping[str, str]] = None) -> bytes:
    # imported here: the config package writes YAML through this module, and the CLI's parser
    # (every `--help`) should not pay torch's second of import time for it
    import safetensors.torch

    # safetensors refuses non-contiguous tensors; detach so autograd views are accepted.
    prepared = {name: t.detach().contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(prepared, metadata=dict(metadata) if metadata else None)


def atomic_save_safetensors(path: os.PathLike | str, tensors: Mapping[str, "torch.Tensor"],
                            metadata: Optional[Mapping[str, str]] = None) -> None:
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def _temp_owner_pid(name: str) -> Optional[int]:
    """The writer's pid if `name` is one of temp_path_for's names, else None."""
    match = _TEMP_NAME.match(name)
    return int(match.group(1)) if match else None


def remove_stale_temp_files(folder: os.PathLike | str) -> list[Path]:
    """Delete the temp files of atomic writes in `folder` whose writer is gone (a killed run can
    leave a whole LoRA's worth behind). Only temp_path_for's own names, and only when the pid in
    the name is not a running process: another writer's live temp file and every other file stay."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid = _temp_owner_pid(entry.name)
        if pid is None or pid_is_running(pid) or not entry.is_file():   # ours included: live
            continue
        _remove_quietly(entry)
        removed.append(entry)
    return removed
