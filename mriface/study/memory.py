"""Process memory: give freed heap pages back to the system between scans.

Its own module because both the per-scan stages and the worker processes
call it, and the worker module already imports the stages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["release_memory"]


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).

    Called after each scan (:func:`~mriface.study.stages.process_scans`) and
    each surface a worker makes: the freed volumes, surfaces and render
    batches (tens of MB each) otherwise stay in the process's heap, and the
    next scan's arrays land in fragments of it, so that a long study's
    resident memory creeps up scan after scan. Results are unaffected.
    """
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None
