"""One process per run folder.

Two runs on the same folder would interleave their checkpoints, and each would report a LoRA that
holds the other's weights. A run therefore holds `<runs>/.<run name>.lock` (next to the run folder,
not inside it: `resume: false` moves the folder aside while the lock is held) with its pid and
host. A second run is refused with the holder's pid; a lock whose process is gone (killed, power
cut) is taken over. The lock is re-entrant within one thread (the headless path takes it before
loading the model, and the training entry point the WebUI also uses takes it again); another
thread of the same process (a second job in the WebUI) is refused like another process.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from .processes import pid_is_running


class RunFolderLocked(RuntimeError):
    """Another live process trains in this run folder."""


_held: dict[str, list] = {}       # lock path -> [holding thread, how many times it holds it]
_held_guard = threading.Lock()


def lock_path(run_dir) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half written by a process that died right then: stale
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if holder.get("host") != socket.gethostname():
        return False  # a process on another machine (shared folder): cannot tell, so respect it
    return not pid_is_running(pid)


def _try_create(path: Path) -> bool:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return True


def _refusal(run_dir, path: Path, holder: dict) -> RunFolderLocked:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return RunFolderLocked(
        f"run folder {run_dir} is in use by another training run (pid {holder.get('pid')} on "
        f"{holder.get('host')}{when}). Wait for it to finish or stop it; if that process is gone "
        f"for good, delete {path}.")


def acquire(run_dir) -> Path:
    path = lock_path(run_dir)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(str(path))
        if held and held[0] == me:
            held[1] += 1
            return path
        if held:
            raise _refusal(run_dir, path, {"pid": os.getpid(), "host": socket.gethostname(),
                                           "since": None})
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # a stale lock is removed and the create retried (another may win)
            if _try_create(path):
                _held[str(path)] = [me, 1]
                return path
            holder = _read_holder(path)
            if holder is None:
                continue          # released between our two calls
            ours = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
            if not ours and not _is_stale(holder):   # ours here: left behind, not in _held
                raise _refusal(run_dir, path, holder)
            path.unlink(missing_ok=True)
        raise RunFolderLocked(f"could not take the lock {path} of run folder {run_dir}; try again")


def release(run_dir) -> None:
    path = lock_path(run_dir)
    with _held_guard:
        held = _held.get(str(path))
        if held is None or held[0] != threading.get_ident():
            return
        held[1] -= 1
        if held[1]:
            return
        _held.pop(str(path))
        holder = _read_holder(path)
        if holder and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_folder(run_dir):
    """Hold the run folder's lock for the duration of the block (see the module docstring)."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
