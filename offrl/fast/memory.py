"""The process's allocator, tuned once by a run at start (``Runtime.apply``), never from a forward pass."""

from __future__ import annotations

import ctypes
import ctypes.util

_allocator_tuned: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Let glibc keep freed heap memory for reuse instead of returning it to the system (idempotent).

    The relu ensemble paths allocate and free activations of several MB every step; with glibc's
    defaults each such block comes back as fresh pages, and the page faults cost about a fifth of a
    continuous CQL step on CPU. The process then holds its peak heap until exit. Returns whether the
    allocator was tuned (False on other C libraries).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            return False
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
        # 32 MB is glibc's upper limit for the mmap threshold on 64-bit systems; packed runs allocate
        # larger blocks than that, so mmap is switched off altogether (every block comes from the heap)
        _allocator_tuned = (
            mallopt(m_mmap_threshold, 32 << 20) == 1
            and mallopt(m_trim_threshold, 1 << 30) == 1
            and mallopt(m_mmap_max, 0) == 1
        )
    return _allocator_tuned
