"""How a study's per-scan work is spread over processes: the executor seam.

:func:`~mriface.study.run_study` hands each list of scans to an executor
(``executor=``, ``workers=``; ``mriface study --workers N`` / ``--ray``):

* ``"sequential"`` - one scan after another in this process (the reference path);
* ``"streaming"`` (:class:`StreamingExecutor`) - a pool of worker processes
  loads and reconstructs the scans ahead of this process (and, on the CPU,
  renders them too), which renders (on CUDA), aligns and embeds them in the
  study's order, and aligns the participants' photographs while it would
  otherwise wait for a worker;
* ``"ray"`` (:class:`mriface.study.ray_executor.RayExecutor`) - the same split
  with Ray tasks for the CPU stages and Ray actors holding the models.

Why results are identical to the sequential path
------------------------------------------------
A worker only *fills the cache*: it runs the surface stage
(:func:`mriface.study.stages._surface_for`: load, reconstruct, write the
surface entry atomically) and, where the pipeline runs on the CPU, renders
the scan (:func:`~mriface.study.worker.prefetch_surface`); it sends back
timings and those renders. This process then calls the very same
:func:`~mriface.study.stages.process_scans` on the scans, in order, with the
renders as its ``renders``; it finds each surface in the cache (an
uncompressed ``.npz`` that reads back bit for bit) and does the rest exactly
as the sequential path would. Renders have the same bits on a worker's one
thread as on this process's several (:func:`mriface.render.shade.shade_points`
makes sure of it); detection and embedding do not (oneDNN and torch split
their work by thread), so they stay here. Everything that decides a result
- cache keys, problems, the render entry - stays in one place.

Why the workers render on the CPU: on 2 cores this process's render, align,
embed and photographs took 156 of the 165 s of an 84-scan study (the
workers' surfaces 100 s), so it was the slowest step; on CUDA it renders a
batch of scans in milliseconds, and rendering stays here.

Batches of scans on the device
------------------------------
With ``batch_scans`` K > 1 (the default on CUDA: 8), the scan asked for and
the next ones whose surfaces are ready, up to K, go through the device
stages together: one render call where the backend batches meshes, one
detection pass over all their renders, one embedding call per face model
(:func:`~mriface.study.stages.process_scans`). Only K scans' surfaces and
renders are in memory at once. On the CPU the default is 1 scan: the
cores are busy either way, and batch sizes can change the networks' last
bits, which one scan at a time keeps identical to the sequential path. A worker that fails or dies
costs nothing but time: the scan is then simply reconstructed here. A
killed study resumes from the cache as before, and a resumed scan whose
surface is cached costs a worker one file hash.

Memory stays flat as the cohort grows: surfaces travel through the cache
folder, not through queues; at most ``lookahead`` scans are handed out
beyond the one being rendered, and each worker holds one volume at a time.

Each worker runs its numerical libraries on ``threads`` threads (default 1),
so that N workers do not each start a thread per core.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import MRIFaceError
from .worker import (  # noqa: F401 - Executor, busy_summary, peak_rss_mb, prefetch_surface: re-exported
    Executor, busy_summary, log_busy, on_cuda, peak_rss_mb, prefetch_surface, resolve_batch_scans, stage_intervals,
    thread_env, worker_copy, worker_main)

__all__ = ["EXECUTORS", "Executor", "StreamingExecutor", "default_workers", "open_executor", "busy_summary"]

log = logging.getLogger("mriface.study")

#: Executor names accepted by ``run_study(executor=...)``.
EXECUTORS = ("auto", "sequential", "streaming", "ray")



def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def open_executor(executor: "str | Executor | None" = "auto", workers: "int | None" = None, *,
                  ray_address: "str | None" = None, batch_scans: "int | None" = None) -> "Executor":
    """An executor by name (use it as a context manager: it owns processes).

    Parameters
    ----------
    executor : str or Executor
        ``"auto"`` (``"streaming"`` when ``workers`` > 1, else ``"sequential"``),
        ``"sequential"``, ``"streaming"`` or ``"ray"``; an :class:`Executor` is returned as is.
    workers : int, optional
        Worker processes for ``"streaming"`` (default: :func:`default_workers`);
        for ``"ray"``, the CPUs of a runtime started here.
    ray_address : str, optional
        For ``"ray"``: a cluster's address (``"auto"``, ``"10.0.0.5:6379"``);
        None starts a local Ray runtime.
    batch_scans : int, optional
        For ``"streaming"`` and ``"ray"``: scans whose device stages run
        together (default: 1 on the CPU, 8 on CUDA); the sequential path
        does one scan at a time.
    """
    if isinstance(executor, Executor):
        return executor
    if executor is None:
        executor = "auto"
    if executor not in EXECUTORS:
        raise MRIFaceError(f"executor={executor!r}: use one of {', '.join(EXECUTORS)}")
    if workers is not None and int(workers) < 1:
        raise MRIFaceError(f"workers={workers}: give at least 1 worker process")
    if executor == "auto":
        executor = "streaming" if workers is not None and int(workers) > 1 else "sequential"
    if executor == "sequential":
        return Executor()
    if executor == "streaming":
        return StreamingExecutor(workers=int(workers) if workers is not None else default_workers(),
                                 batch_scans=batch_scans)
    from .ray_executor import RayExecutor

    return RayExecutor(address=ray_address, num_cpus=workers, batch_scans=batch_scans)


# --------------------------------------------------------------------------- the streaming executor
class _Worker:
    """One worker process, its pipe and the tasks handed to it."""

    def __init__(self, proc: Any, conn: Any):
        self.proc, self.conn = proc, conn
        self.assigned: list[tuple[int, int]] = []  # (generation, index), oldest first


class StreamingExecutor(Executor):
    """Load and reconstruct scans in worker processes while this process renders, aligns and embeds.

    Parameters
    ----------
    workers : int
        Worker processes (default: the machine's cores).
    lookahead : int, optional
        Scans handed out beyond the one this process is on (default ``2 * workers``).
    threads : int
        Threads of each worker's numerical libraries (default 1).
    batch_scans : int, optional
        Scans whose device stages (render, align, embed) run together
        (:func:`~mriface.study.stages.process_scans`): up to this many
        consecutive scans whose surfaces are ready. Default: 1 on the CPU
        (every byte as the sequential path), 8 on CUDA.
    render_in_workers : bool, optional
        Whether the workers also render each scan (this process then aligns
        and embeds). Default: where the pipeline's device is the CPU, for
        there this process's render, align, embed and photographs were the
        slowest step of the pipeline; on CUDA this process renders, in
        batches on the device.
    nice : int
        How much lower the workers' scheduling priority is than this
        process's (``os.nice``; default 10, 0 for none). This process aligns
        and embeds in short bursts on every core; when a worker held one of
        the cores, every thread of a burst waited for it: on 2 cores, 40
        scans' detection took 39 s beside workers at the same priority and
        12 s beside workers at nice 10. At a lower priority the workers
        yield at once and still get every idle cycle.
    start_method : str
        ``"spawn"`` (default) or ``"forkserver"``; never ``"fork"``: a forked
        copy of a process that has used torch's thread pools can hang.

    Attributes
    ----------
    stats : dict
        After :meth:`close`: busy seconds per stage and where (``busy_s``),
        ``overlap_s`` (workers and this process busy at once), ``wall_s``,
        ``prefetched`` (surfaces made by workers), ``computed_here`` (scans a
        worker could not do), ``worker_deaths``, ``batch_scans`` and
        ``batches`` (device-stage calls of more than one scan, and their mean size).

    Notes
    -----
    A thread of this process feeds the workers (two tasks each, so that
    none idles while this process renders) and collects their answers; it
    notices a worker that died (killed, out of memory) by its process
    sentinel: the scans it held are then done here, and a new worker starts.
    """

    name = "streaming"
    backlog = 2

    def __init__(self, workers: "int | None" = None, *, lookahead: "int | None" = None, threads: int = 1,
                 batch_scans: "int | None" = None, render_in_workers: "bool | None" = None, nice: int = 10,
                 start_method: str = "spawn"):
        super().__init__()
        self.workers = int(workers) if workers is not None else default_workers()
        if self.workers < 1:
            raise MRIFaceError(f"workers={workers}: give at least 1 worker process")
        if start_method == "fork":
            raise MRIFaceError("start_method='fork': use 'spawn' or 'forkserver' (torch and fork do not mix)")
        self.lookahead = int(lookahead) if lookahead is not None else 2 * self.workers
        self.threads = max(1, int(threads))
        self.nice = max(0, int(nice))
        self.batch_scans = None if batch_scans is None else resolve_batch_scans(batch_scans, None)
        self.render_in_workers = render_in_workers
        self._batches: list[int] = []
        self.start_method = start_method
        self._mp = None
        self._setup: "tuple | None" = None
        self._pool: list[_Worker] = []
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int, Any, Any]] = []  # (generation, index, scan, render)
        self._done: dict[tuple[int, int], tuple[str, Any]] = {}
        self._respawn = 0
        self._stop = False
        self._thread: "threading.Thread | None" = None
        self._gen = 0
        self._t0: "float | None" = None
        self._intervals: list[tuple[str, str, float, float]] = []
        self._prefetched = self._fallbacks = self._deaths = 0
        self._photo_todo: list = []
        self._photo_done: dict[str, tuple[list, Any]] = {}
        self._ctx = None

    # ---- processes
    def __enter__(self):
        self._processes()
        return self

    def _processes(self) -> None:
        """Start the workers (before the pipeline is known: their imports overlap with the study's set-up)."""
        if self._mp is None:
            self._mp = mp.get_context(self.start_method)
            for _ in range(self.workers):
                self._spawn()

    def _start(self, pipeline: Any, cache_root: Path) -> None:
        if self._thread is not None:
            return
        self._processes()
        self._setup = ("setup", worker_copy(pipeline), str(cache_root))
        with self._cond:
            for w in self._pool:
                w.conn.send(self._setup)
        self._thread = threading.Thread(target=self._dispatch, name="mriface-dispatch", daemon=True)
        self._thread.start()
        log.info("executor streaming: %d worker processes (%s, %d thread%s each), lookahead %d scans, "
                 "device stages in batches of up to %d scans", self.workers, self.start_method, self.threads,
                 "" if self.threads == 1 else "s", self.lookahead, resolve_batch_scans(self.batch_scans, pipeline))

    def _spawn(self) -> None:
        """Start one worker (on the calling thread: the thread-pool variables go through os.environ)."""
        ours, theirs = self._mp.Pipe(duplex=True)
        p = self._mp.Process(target=worker_main, name="mriface-surface", args=(theirs, self.threads, self.nice),
                             daemon=True)
        with thread_env(self.threads):
            p.start()
        theirs.close()
        if self._setup is not None:
            with contextlib.suppress(OSError, ValueError):
                ours.send(self._setup)
        with self._cond:
            self._pool.append(_Worker(p, ours))
            self._cond.notify_all()

    def _dispatch(self) -> None:
        """Dispatcher thread: hand out tasks, collect answers, notice dead workers."""
        from multiprocessing.connection import wait

        while True:
            with self._cond:
                if self._stop:
                    return
                pool = list(self._pool)
                # hand out: the oldest pending tasks to the least loaded live workers
                for w in sorted(pool, key=lambda w: len(w.assigned)):
                    while self._pending and len(w.assigned) < self.backlog:
                        task = self._pending.pop(0)
                        gen, idx = task[:2]
                        try:
                            w.conn.send(task)
                        except (OSError, ValueError):  # it just died: the sentinel below says so
                            self._pending.insert(0, task)
                            break
                        w.assigned.append((gen, idx))
                if not pool and self._pending and self._respawn == 0:
                    for gen, idx, *_ in self._pending:  # no worker left: this process does them
                        self._done[(gen, idx)] = ("failed", "no worker process left")
                    self._pending.clear()
                    self._cond.notify_all()
            if not pool:
                time.sleep(0.05)
                continue
            ready = wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout=0.1)
            for w in pool:
                if w.conn in ready:
                    self._receive(w)
                if w.proc.sentinel in ready and not w.proc.is_alive():
                    while w.conn.poll():  # answers it sent before it died
                        if not self._receive(w):
                            break
                    self._died(w)

    def _receive(self, w: _Worker) -> bool:
        try:
            kind, gen, idx, payload = w.conn.recv()
        except (EOFError, OSError):
            return False
        if kind != "start":
            with self._cond:
                if (gen, idx) in w.assigned:
                    w.assigned.remove((gen, idx))
                self._done[(gen, idx)] = (kind, payload)
                self._cond.notify_all()
        return True

    def _died(self, w: _Worker) -> None:
        with self._cond:
            if w not in self._pool:
                return
            self._pool.remove(w)
            self._deaths += 1
            for key in w.assigned:  # its unfinished scans: done by the main process
                self._done[key] = ("failed", f"worker {w.proc.pid} died (exit code {w.proc.exitcode})")
            lost = [i for _, i in w.assigned]
            w.assigned = []
            if self._deaths <= 2 * self.workers:
                self._respawn += 1  # started by the main thread (see _wait)
            self._cond.notify_all()
        log.warning("executor streaming: worker %s died (exit code %s)%s", w.proc.pid, w.proc.exitcode,
                    f" holding scans {lost} of this list: done in the main process" if lost else "")
        with contextlib.suppress(Exception):
            w.conn.close()

    def close(self) -> None:
        if self._mp is not None:
            with self._cond:
                self._stop = True
                pool, self._pool = list(self._pool), []
            if self._thread is not None:
                self._thread.join(5)
                self._thread = None
            self._mp = None
            for w in pool:
                with contextlib.suppress(Exception):
                    w.conn.send(None)
            deadline = time.time() + 2  # workers hold nothing unwritten: entries are atomic
            for w in pool:
                w.proc.join(max(0.0, deadline - time.time()))
                if w.proc.is_alive():
                    w.proc.terminate()
                    w.proc.join(2)
                with contextlib.suppress(Exception):
                    w.conn.close()
        if self._t0 is not None:
            s = busy_summary(self._intervals, time.time() - self._t0)
            s.update(executor=self.name, workers=self.workers, prefetched=self._prefetched,
                     computed_here=self._fallbacks, worker_deaths=self._deaths,
                     photos_while_waiting=len(self._photo_done) + self._photos_used,
                     batch_scans=self.batch_scans, batches=len(self._batches),
                     mean_batch=sum(self._batches) / len(self._batches) if self._batches else None,
                     worker_peak_rss_mb=self._worker_rss or None)
            self.stats = s
            log_busy(f"streaming ({self.workers} workers)", s)
            self._t0 = None

    _photos_used = 0
    _worker_rss = 0.0

    # ---- photographs in the gaps
    def expect_photos(self, ctx, items):
        self._ctx = ctx
        self._photo_todo = [(p, list(paths)) for p, paths in items]

    def _one_photo_while_waiting(self) -> bool:
        """Align and embed one announced participant's photographs; False when there is none left."""
        if not self._photo_todo or self._ctx is None:
            return False
        from .stages import process_photos

        participant, paths = self._photo_todo.pop(0)
        ctx = self._ctx
        a = time.time()
        try:
            res = process_photos(participant, paths, ctx.pipeline, ctx.cache_root)
        except Exception as exc:  # noqa: BLE001 - done again (and reported) when the probes are collected
            log.debug("photographs of %s while waiting: %s; left for later", participant, exc)
            return True
        self._intervals.append(("main", "photos", a, time.time()))
        self._photo_done[participant] = ([Path(p) for p in paths], res)
        return True

    def photo(self, ctx, participant, paths):
        done = self._photo_done.pop(participant, None)
        if done is not None and done[0] == [Path(p) for p in paths]:
            self._photos_used += 1
            return done[1]
        a = time.time()
        res = super().photo(ctx, participant, paths)
        if self._t0 is not None:
            self._intervals.append(("main", "photos", a, time.time()))
        return res

    # ---- scans
    def _wait(self, key: tuple[int, int]) -> tuple[str, Any]:
        """Block until a worker answered for ``key``; align photographs meanwhile."""
        while True:
            with self._cond:
                if key in self._done:
                    return self._done.pop(key)
                respawn, self._respawn = self._respawn, 0
            for _ in range(respawn):
                self._spawn()
            if respawn:
                continue
            if not self._one_photo_while_waiting():
                with self._cond:
                    if key not in self._done:
                        self._cond.wait(0.2)

    def _took(self, kind: str, payload: Any, pipeline: Any, role: str, scan: Any) -> dict:
        """Book a worker's answer for one scan; its load/surface timings (empty when it did nothing)."""
        if kind != "done":
            self._fallbacks += 1
            log.info("%s %s: no surface from a worker (%s); reconstructing it here", role, scan.subject, payload)
            return {}
        self._prefetched += bool(payload["timings"])
        memo = getattr(pipeline, "_digests", None)
        if isinstance(memo, dict):  # the worker hashed the file: no need to do it again
            memo.update(payload["digests"])
        self._intervals.extend(("workers", s, x, y) for s, x, y in payload["intervals"])
        self._worker_rss = max(self._worker_rss, payload.get("peak_rss_mb") or 0.0)
        return payload["timings"]

    def plan(self, ctx, scans, role, protocol, *, transform=None):
        from .stages import process_scan, process_scans

        if transform is not None and getattr(transform, "on", "volume") != "surface":
            # a volume transform runs where the scan is reconstructed: here (the function may not pickle)
            return process_scan
        if self._t0 is None:
            self._t0 = time.time()
        self._start(ctx.pipeline, ctx.cache_root)
        self._gen += 1
        gen, scans = self._gen, list(scans)
        k = resolve_batch_scans(self.batch_scans, ctx.pipeline)
        ahead = max(self.lookahead, k)  # a batch can only take surfaces that were handed out
        state = {"next": 0, "sent": 0}
        ready: dict[int, Any] = {}  # results of the current batch's later scans, until they are asked for

        render = (role, protocol) if transform is None and (
            self.render_in_workers if self.render_in_workers is not None else not on_cuda(ctx.pipeline)) else None

        def hand_out(upto: int) -> None:
            with self._cond:
                while state["sent"] < min(upto, len(scans)):
                    self._pending.append((gen, state["sent"], scans[state["sent"]], render))
                    state["sent"] += 1

        hand_out(ahead + 1)

        def process(scan, role_, protocol_, pipeline, cache_root, **kw):
            i = state["next"]
            if i >= len(scans) or scans[i] is not scan:  # not in the planned order: no prefetch for it
                return process_scan(scan, role_, protocol_, pipeline, cache_root, **kw)
            state["next"] += 1
            hand_out(i + 1 + ahead)
            if i in ready:
                return ready.pop(i)
            a = time.time()
            answers = [self._wait((gen, i))]
            self._intervals.append(("main", "wait", a, time.time()))
            with self._cond:  # and the next scans whose surfaces are ready by now, up to k in all
                while len(answers) < k and i + len(answers) < len(scans) and (gen, i + len(answers)) in self._done:
                    answers.append(self._done.pop((gen, i + len(answers))))
            batch = scans[i:i + len(answers)]
            extra = [self._took(kind, payload, pipeline, role_, s) for (kind, payload), s in zip(answers, batch)]
            made = {(s.subject, str(s.path)): (payload["renders"], payload["timings"]["render"])
                    for (kind, payload), s in zip(answers, batch)
                    if kind == "done" and payload.get("renders") is not None and protocol_ is protocol}
            results = process_scans(batch, role_, protocol_, pipeline, cache_root, renders=made, **kw)
            self._intervals.extend(stage_intervals(results, time.time(), elsewhere=[
                ("render",) if (s.subject, str(s.path)) in made else () for s in batch]))
            if len(batch) > 1:
                self._batches.append(len(batch))
            for j, (res, x) in enumerate(zip(results, extra)):
                if x and not res.cached:
                    res.timings = {**x, **res.timings}
                if j:
                    ready[i + j] = res
            return results[0]

        return process
