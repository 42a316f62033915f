"""The executors' base class, the streaming worker side, and the busy-time bookkeeping.

:class:`Executor` is the seam (the sequential executor; see :mod:`mriface.study.executor`).
:func:`prefetch_surface` is what a worker process (or a Ray task) does for
one scan: make sure its surface is in the study's cache. :func:`busy_summary`
turns (where, stage, start, end) intervals into per-stage busy seconds and
the overlap of the workers' and the main process's work.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .memory import release_memory

__all__ = ["Executor", "busy_summary", "log_busy", "worker_copy", "prefetch_surface", "peak_rss_mb", "worker_main",
           "thread_env", "resolve_batch_scans", "on_cuda", "stage_intervals", "release_memory"]

log = logging.getLogger("mriface.study")

#: Environment variables that size the thread pools of OpenMP, BLAS and friends.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS")

# --------------------------------------------------------------------------- the seam
class Executor:
    """The sequential executor, and the interface of the others.

    ``RunContext.scans`` asks :meth:`plan` for the function that processes
    each scan of a list (called in the list's order, with
    :func:`~mriface.study.stages.process_scan`'s signature). The photograph
    probes ask :meth:`photo` for each participant's result; :meth:`expect_photos`
    announces them early so that an executor may align them while it waits.
    """

    name = "sequential"

    def __init__(self):
        self.stats: dict[str, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Stop whatever the executor started; log its busy times."""

    def plan(self, ctx: Any, scans: Sequence[Any], role: str, protocol: Any, *,
             transform: Any = None) -> Callable[..., Any]:
        """The function that processes each of ``scans`` (in order), like ``process_scan``."""
        from .stages import process_scan

        return process_scan

    def expect_photos(self, ctx: Any, items: Iterable[tuple[str, Sequence[Path]]]) -> None:
        """The participants' photographs that :meth:`photo` will be asked for (a hint)."""

    def photo(self, ctx: Any, participant: str, paths: Sequence[Path]) -> Any:
        """One participant's :class:`~mriface.study.stages.PhotoResult`."""
        from .stages import process_photos

        return process_photos(participant, paths, ctx.pipeline, ctx.cache_root)


# --------------------------------------------------------------------------- batches of scans
#: Scans whose device stages run together on CUDA when the executor is not told (``batch_scans=None``).
CUDA_BATCH_SCANS = 8


def resolve_batch_scans(batch_scans: "int | None", pipeline: Any) -> int:
    """Scans per batch of device stages: ``batch_scans``, or by the pipeline's device (None).

    None means 1 on the CPU, where a batch buys nothing (the CPU's cores are
    busy either way) and one scan at a time keeps every byte of the
    sequential path, and :data:`CUDA_BATCH_SCANS` on CUDA, where one render,
    detection and embedding call for several scans keeps the GPU busy.
    """
    if batch_scans is not None:
        if int(batch_scans) < 1:
            from ..errors import MRIFaceError

            raise MRIFaceError(f"batch_scans={batch_scans}: give at least 1 scan per batch")
        return int(batch_scans)
    return CUDA_BATCH_SCANS if on_cuda(pipeline) else 1


def on_cuda(pipeline: Any) -> bool:
    """Whether the pipeline's stages run on a CUDA device (a pipeline without ``device``: the CPU)."""
    dev = getattr(pipeline, "device", "cpu")
    return getattr(dev, "type", str(dev)) == "cuda"


def stage_intervals(results: Sequence[Any], end: float, where: str = "main",
                    elsewhere: "Sequence[Iterable[str]] | None" = None) -> list:
    """(where, stage, start, end) of the stages a batch of results did here, laid end to end backwards from ``end``.

    Each stage's seconds are summed over the batch (a batched stage's time is
    shared out among its scans, so the sum is the batch's time).
    ``elsewhere`` (one per result): stages of that result that a worker did,
    left out.
    """
    out = []
    skip = [set(e) for e in elsewhere] if elsewhere is not None else [set()] * len(results)
    for stage in ("embed", "align", "render", "transform", "surface", "load"):
        total = sum(r.timings.get(stage, 0.0) for r, x in zip(results, skip) if not r.cached and stage not in x)
        if total > 0:
            out.append((where, stage, end - total, end))
            end -= total
    return out


# --------------------------------------------------------------------------- busy time and overlap
def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(u: list, v: list) -> float:
    i = j = 0
    total = 0.0
    while i < len(u) and j < len(v):
        lo, hi = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        total += max(0.0, hi - lo)
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


def busy_summary(intervals: Sequence[tuple[str, str, float, float]], wall: float) -> dict:
    """Per-stage busy seconds and how much the workers' and this process's work overlapped.

    Parameters
    ----------
    intervals : sequence of (where, stage, start, end)
        ``where`` is ``"workers"`` or ``"main"``; times from ``time.time()`` (seconds).
    wall : float
        Seconds from the first hand-out to the last result.
    """
    busy: dict[str, float] = {}
    for where, stage, a, b in intervals:
        busy[f"{stage} ({where})"] = busy.get(f"{stage} ({where})", 0.0) + (b - a)
    workers = _union((a, b) for w, _, a, b in intervals if w == "workers")
    main = _union((a, b) for w, s, a, b in intervals if w == "main" and s != "wait")
    both = _intersection(workers, main)
    total = sum(busy.values()) - busy.get("wait (main)", 0.0)
    return {"wall_s": wall, "busy_s": busy, "workers_busy_s": _length(workers), "main_busy_s": _length(main),
            "overlap_s": both, "overlap_fraction": both / wall if wall > 0 else 0.0,
            "parallelism": total / wall if wall > 0 else 0.0}


def log_busy(name: str, summary: dict) -> None:
    """One log line: the stages' busy time and their overlap."""
    busy = ", ".join(f"{k} {v:.2f} s" for k, v in summary["busy_s"].items())
    log.info("executor %s: wall %.2f s; busy: %s; workers and main busy at once %.2f s (%.0f%% of wall); "
             "work / wall = %.2f", name, summary["wall_s"], busy, summary["overlap_s"],
             100 * summary["overlap_fraction"], summary["parallelism"])


# --------------------------------------------------------------------------- worker side
def worker_copy(pipeline: Any) -> Any:
    """A copy of the pipeline to send to a worker: the same options, no models built."""
    twin = copy.copy(pipeline)
    if isinstance(getattr(twin, "_aligner", None), dict):
        twin._aligner = {}
    if hasattr(twin, "_embedder"):
        twin._embedder = None
    return twin


def prefetch_surface(pipeline: Any, scan: Any, cache_root: "str | Path",
                     render: "tuple[str, Any] | None" = None) -> dict:
    """Worker side: make sure ``scan``'s surface is in the cache (load + reconstruct + write); maybe render it.

    Parameters
    ----------
    render : (role, RenderProtocol), optional
        Also render the scan under this protocol, unless its render entry
        for ``role`` is cached (the CPU executors: the main process then
        only aligns and embeds; :func:`~mriface.study.stages.process_scans`'
        ``renders``). Renders have the same bits with any number of threads
        (:func:`mriface.render.shade.shade_points`), so a one-thread worker
        makes what the main process would.

    Returns
    -------
    dict
        ``timings`` (seconds of ``load``/``surface``/``render``; empty when
        nothing was done), ``intervals`` [(stage, start, end)] in
        ``time.time()`` seconds, ``renders`` (the RenderBatch, or None),
        ``digests`` (the pipeline's file-hash memo for this scan, so that
        this process need not hash the file again), ``pid``.
    """
    from . import cache as _cache
    from .stages import _read, _surface_for, _timed, render_entry

    timings: dict[str, float] = {}
    cache = _cache.CacheLayout(cache_root)
    surface = _surface_for(scan, pipeline, cache, timings, lambda name: None)
    batch = None
    if render is not None and _read(render_entry(scan, render[0], render[1], pipeline, cache)[1]) is None:
        with _timed("render", timings, lambda name: None):
            batch = pipeline.render(surface, scan.subject, render[1])
    del surface
    release_memory()  # the volume and the surface are gone: return their pages before the next scan
    end = time.time()
    intervals = []
    for stage in reversed([s for s in ("load", "surface", "render") if s in timings]):
        intervals.append((stage, end - timings[stage], end))
        end -= timings[stage]
    memo = getattr(pipeline, "_digests", None)
    digests = {k: v for k, v in memo.items() if k and k[0] == str(scan.path)} if isinstance(memo, dict) else {}
    return {"timings": timings, "intervals": intervals[::-1], "renders": batch, "digests": digests,
            "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> "float | None":
    """This process's peak resident memory (MiB), from ``VmHWM``; None where /proc is missing.

    Not ``getrusage``: its ``ru_maxrss`` survives ``exec``, so a spawned
    process would report the peak of the process it was forked from.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _limit_threads(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def worker_main(conn: Any, threads: int, nice: int = 0) -> None:
    """A streaming worker: ``("setup", pipeline, cache_root)``, then (generation, index, scan, render) tasks until None.

    Started before the study knows its pipeline, so that its imports overlap
    with reading the inputs; the pipeline comes as the first message.

    One pipe per worker, not a shared queue: a worker killed while it waits
    on a shared queue would hold the queue's lock and stall the others.
    """
    _limit_threads(threads)
    if nice > 0:
        with contextlib.suppress(OSError, AttributeError):  # lowering one's own priority needs no rights
            os.nice(int(nice))
    from .stages import _surface_for  # noqa: F401 - import the stages now, before the first scan arrives

    pipeline = cache_root = None
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        if task[0] == "setup":
            _, pipeline, cache_root = task
            continue
        gen, idx, scan, render = task
        conn.send(("start", gen, idx, os.getpid()))
        try:
            out = prefetch_surface(pipeline, scan, cache_root, render)
            conn.send(("done", gen, idx, out))
        except Exception as exc:  # noqa: BLE001 - reported; the main process then does the scan itself
            first = (str(exc).splitlines() or [""])[0]
            conn.send(("failed", gen, idx, f"{type(exc).__name__}: {first}"))


@contextlib.contextmanager
def thread_env(threads: int):
    """Set the thread-pool variables for processes started inside (spawned children copy os.environ)."""
    old = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
