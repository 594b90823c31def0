"""Whether a process that left a file behind (a lock, a temp file) is still alive."""
from __future__ import annotations

import os


def pid_is_running(pid: int) -> bool:
    """True when a process with this id exists on this machine (ours included)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would TERMINATE the process on Windows
        return _windows_pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _windows_pid_exists(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]  # (exists on Windows only)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: it exists, someone else's
    kernel32.CloseHandle(handle)
    return True
