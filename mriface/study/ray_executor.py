"""Ray as the study's distributed engine (``mriface study --ray [ADDRESS]``; extra ``mriface[ray]``).

The same split as the streaming executor (:mod:`mriface.study.executor`),
on as many machines as a Ray cluster has:

* **CPU stages as Ray tasks.** Each scan's load and reconstruction is one
  task (:func:`mriface.study.executor.prefetch_surface`) that writes the
  surface into the study's cache folder. Ray retries a task whose worker
  died (``max_retries``), and a rerun finds every finished surface and
  render entry in the cache: the cache folder must therefore be one that
  every node sees (NFS, a mounted bucket, a Kubernetes volume).
* **Device stages as Ray actors** that hold the face models: each runs
  :func:`~mriface.study.stages.process_scan` (render, align, embed; the
  surface comes from the cache) and the participants' photographs. An actor
  asks for one GPU (``num_gpus=1``) when the study's device is CUDA, and
  there is one actor per GPU in the cluster; on CPUs, one actor.
  An actor call takes a batch of ``batch_scans`` consecutive scans (1 on
  the CPU, 8 on CUDA by default; :func:`~mriface.study.stages.process_scans`)
  with their surface tasks' results as arguments, so Ray starts it as soon
  as those surfaces exist, while the driver (this process) only collects
  results in the study's order and writes the tables.

Results are identical to the sequential path for the same reason as the
streaming executor's: every scan goes through the one ``process_scan``, and
a cached surface reads back bit for bit. Scan, photograph and output paths
must be the same on every node (a shared file system).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import MRIFaceError
from .worker import (Executor, busy_summary, log_busy, prefetch_surface, resolve_batch_scans, stage_intervals,
                     worker_copy)

__all__ = ["RayExecutor"]

log = logging.getLogger("mriface.study")


def _ray():
    try:
        import ray
    except ImportError:
        raise MRIFaceError("--ray needs Ray: pip install 'mriface[ray]' (or run without --ray: the local "
                           "streaming executor uses every core of this machine)") from None
    return ray


class _DeviceStage:
    """Ray actor body: a copy of the pipeline whose models load on first use, kept for the whole study."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def process(self, scans, role, protocol, cache_root, images_dir, transform, *prefetched: "dict | None"):
        """Scans' device stages in one batch (:func:`~mriface.study.stages.process_scans`).

        ``prefetched``: the scans' surface tasks' answers (Ray passes them once
        every task has finished), or nothing when there were no surface tasks.
        """
        from .stages import process_scans

        results = process_scans(scans, role, protocol, self.pipeline, cache_root, images_dir=images_dir,
                                transform=transform)
        intervals = stage_intervals(results, time.time())
        for res, pre in zip(results, prefetched):
            if pre:
                intervals += [("workers", s, x, y) for s, x, y in pre["intervals"]]
                if pre["timings"] and not res.cached:
                    res.timings = {**pre["timings"], **res.timings}
        return results, intervals

    def photos(self, participant, paths, cache_root):
        from .stages import process_photos

        a = time.time()
        return process_photos(participant, paths, self.pipeline, cache_root), ("main", "photos", a, time.time())


class RayExecutor(Executor):
    """CPU stages as Ray tasks, device stages as Ray actors holding the models.

    Parameters
    ----------
    address : str, optional
        A running cluster (``"auto"`` on one of its nodes, ``"HOST:6379"``).
        None: join the runtime this process already started, or start a
        local one (stopped again when the study ends).
    num_cpus : int, optional
        CPUs of a local runtime started here (default: all).
    actors : int, optional
        Device-stage actors (default: one per GPU when the device is CUDA, else 1).
    lookahead : int, optional
        Scans submitted beyond the one whose result the driver waits for
        (default: 4 per CPU of the cluster); bounds the driver's memory.
    max_retries : int
        Retries of a surface task whose worker died (Ray's own retry).
    batch_scans : int, optional
        Consecutive scans whose device stages run in one actor call
        (:func:`~mriface.study.stages.process_scans`; the call starts when all
        their surfaces exist). Default: 1 on the CPU, 8 on CUDA.
    init_kwargs : dict, optional
        More :func:`ray.init` arguments for a runtime started here.
    """

    name = "ray"

    def __init__(self, address: "str | None" = None, num_cpus: "int | None" = None, *,
                 actors: "int | None" = None, lookahead: "int | None" = None, max_retries: int = 3,
                 batch_scans: "int | None" = None, init_kwargs: "dict | None" = None):
        super().__init__()
        self.address = address
        self.num_cpus = num_cpus
        self.n_actors = actors
        self.lookahead = lookahead
        self.max_retries = int(max_retries)
        self.batch_scans = None if batch_scans is None else resolve_batch_scans(batch_scans, None)
        self.init_kwargs = dict(init_kwargs or {})
        self._owns = False
        self._actors: list = []
        self._photo_refs: dict = {}
        self._photo_items: list = []
        self._intervals: list = []
        self._t0: "float | None" = None
        self._fallbacks = 0

    # ---- runtime
    def __enter__(self):
        ray = _ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if self.address is None:  # a local runtime: this machine only, small object store
                kw.update(num_cpus=self.num_cpus, _node_ip_address="127.0.0.1",
                          object_store_memory=200 * 2**20)
            kw.update(self.init_kwargs)
            try:
                ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MRIFaceError(f"--ray {self.address or ''}: could not start or join a Ray cluster: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            self._owns = True
        res = ray.cluster_resources()
        log.info("executor ray: %s, %g CPUs, %g GPUs", self.address or "local runtime", res.get("CPU", 0),
                 res.get("GPU", 0))
        return self

    def close(self) -> None:
        ray = _ray()
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._t0 is not None:
            s = busy_summary(self._intervals, time.time() - self._t0)
            s.update(executor=self.name, actors=self.n_actors, computed_by_driver_fallback=self._fallbacks,
                     batch_scans=self.batch_scans)
            self.stats = s
            log_busy("ray", s)
            self._t0 = None
        if self._owns and ray.is_initialized():
            ray.shutdown()
            self._owns = False

    def _start(self, ctx) -> None:
        if self._actors:
            return
        ray = _ray()
        pipeline = ctx.pipeline
        cuda = getattr(getattr(pipeline, "device", None), "type", "cpu") == "cuda"
        res = ray.cluster_resources()
        if self.n_actors is None:
            self.n_actors = max(1, int(res.get("GPU", 0))) if cuda else 1
        if self.lookahead is None:
            self.lookahead = max(2, 4 * int(res.get("CPU", 1)))
        opts = {"num_gpus": 1} if cuda else {"num_cpus": 1}
        actor = ray.remote(_DeviceStage).options(max_restarts=2, max_task_retries=2, **opts)
        twin = worker_copy(pipeline)
        self._actors = [actor.remote(twin) for _ in range(self.n_actors)]
        self._surface = ray.remote(prefetch_surface).options(num_cpus=1, max_retries=self.max_retries)
        self._pipe_ref = ray.put(twin)
        self._t0 = time.time()
        for i, (participant, paths) in enumerate(self._photo_items):  # queued on the actors behind the first scans
            self._photo_refs[participant] = (list(paths), self._actors[i % len(self._actors)].photos.remote(
                participant, list(paths), str(ctx.cache_root)))

    # ---- photographs
    def expect_photos(self, ctx, items):
        self._photo_items = [(p, [Path(x) for x in paths]) for p, paths in items]

    def photo(self, ctx, participant, paths):
        ray = _ray()
        got = self._photo_refs.pop(participant, None)
        if got is not None and got[0] == [Path(p) for p in paths]:
            try:
                res, interval = ray.get(got[1])
                self._intervals.append(interval)
                return res
            except ray.exceptions.RayError as exc:
                log.warning("photographs of %s failed on Ray (%s); done here", participant,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return super().photo(ctx, participant, paths)

    # ---- scans
    def plan(self, ctx, scans, role, protocol, *, transform=None):
        from .stages import process_scan

        ray = _ray()
        self._start(ctx)
        scans = list(scans)
        k = resolve_batch_scans(self.batch_scans, ctx.pipeline)
        prefetch = transform is None or getattr(transform, "on", "volume") == "surface"
        images = ctx.images_root / role if ctx.images_root else None
        cache_root = str(ctx.cache_root)
        refs: dict[int, Any] = {}  # first scan of a batch -> its actor call
        ready: dict[int, Any] = {}  # results of a batch's later scans, until they are asked for
        state = {"next": 0, "sent": 0}

        def call(i: int, batch: list, pre: list):
            return self._actors[(i // k) % len(self._actors)].process.remote(
                batch, role, protocol, cache_root, images, transform, *pre)

        def submit(upto: int) -> None:
            while state["sent"] < min(upto, len(scans)):
                i = state["sent"]
                batch = scans[i:i + k]
                pre = [self._surface.remote(self._pipe_ref, s, cache_root) for s in batch] if prefetch else []
                refs[i] = call(i, batch, pre)
                state["sent"] += len(batch)

        submit(max(self.lookahead, k))

        def process(scan, role_, protocol_, pipeline, cache_root_, **kw):
            i = state["next"]
            if i >= len(scans) or scans[i] is not scan:
                return process_scan(scan, role_, protocol_, pipeline, cache_root_, **kw)
            state["next"] += 1
            submit(i + 1 + max(self.lookahead, k))
            if i in ready:
                return ready.pop(i)
            batch = scans[i:i + k]
            a = time.time()
            try:
                results, intervals = ray.get(refs.pop(i))
            except ray.exceptions.RayError as exc:  # a surface task failed for good, or an actor died
                self._fallbacks += 1
                log.info("%s %s: Ray could not do it (%s); doing it on an actor without the surface tasks",
                         role_, scan.subject, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                try:
                    results, intervals = ray.get(call(i, batch, []))
                except ray.exceptions.RayError:
                    results = [process_scan(s, role_, protocol_, pipeline, cache_root_, **kw) for s in batch]
                    intervals = []
            self._intervals.append(("main", "wait", a, time.time()))
            self._intervals.extend(intervals)
            for j, res in enumerate(results[1:], 1):
                ready[i + j] = res
            return results[0]

        return process
