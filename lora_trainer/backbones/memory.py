"""Handing memory back to the OS once a backbone drops parts it no longer needs."""
from __future__ import annotations

import sys


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``).

    Without the trim, memory freed by dropping a model (text encoders after caching) or by the
    loader's per-tensor buffers stays in the C heap and keeps counting in RSS: the next
    allocations reuse it, but the peak and what other processes can use do not go down."""
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # musl or another libc: nothing to trim through this call
        pass
