"""How many threads the surface stage's numpy/scipy steps may use, and running a step in slabs."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

__all__ = ["surface_threads", "in_slabs"]


def surface_threads() -> int:
    """Threads for the surface stage: ``OMP_NUM_THREADS`` when set, else the cores this process may use.

    The study's worker processes set ``OMP_NUM_THREADS`` (one thread each by
    default), so a pool of workers does not oversubscribe the cores.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def in_slabs(step: Callable[[slice], None], length: int, *, min_length: int = 32) -> None:
    """Run ``step(slice)`` over slabs of ``range(length)`` on :func:`surface_threads` threads.

    For steps whose output slab depends on the same input slab only (a 1D
    filter or a resampling along another axis, written into a slab of a
    preallocated output): the result is bit-identical to one call on the
    whole range, and numpy/scipy release the GIL inside, so on 2 cores such a
    step takes about half the time. One slab (a single call) when one thread
    is allowed or ``length`` is short.
    """
    n = max(1, min(surface_threads(), 4, length // max(1, min_length)))
    if n == 1:
        step(slice(0, length))
        return
    bounds = [length * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(step, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]:
            f.result()
