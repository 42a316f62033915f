"""A study run's bookkeeping: its log file, progress bars, and what was computed, cached or failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import MRIFaceError
from ..inputs import Problem, Scan

__all__ = ["LogFile", "OutputLock", "StudyLockedError", "bar", "RunContext", "input_roots"]

log = logging.getLogger("mriface.study")

#: the lock file of an output folder (held while a study writes into it)
LOCK_NAME = ".mriface-study.lock"


class StudyLockedError(MRIFaceError):
    """Another study is writing into the same output folder."""


class OutputLock:
    """Hold an exclusive lock on a study's output folder; refuse a second study at once.

    The lock is an ``flock`` on ``<out>/.mriface-study.lock``: the kernel
    drops it when the holder exits in any way (even ``kill -9``), so a stale
    lock never blocks a resume. A second study into the same folder is
    refused with a clear message instead of waiting: two runs into one
    folder are almost always a mistake (the same command started twice, or
    two different studies given the same ``--out``), and a silent wait would
    let the second one overwrite the first's report afterwards. The cache
    itself may be shared (``--cache-dir``): its entries are written
    atomically, so no lock is needed there.

    On entry it also creates the folder (permission denied -> a
    :class:`~mriface.study.guard.StudyEnvironmentError` that says so) and
    removes the ``.part`` files a killed run left (all of them in ``out``,
    which this lock now owns; in a cache outside ``out`` only those untouched
    for an hour, since another study may be writing there).
    """

    def __init__(self, out: Path, cache_root: "Path | None" = None):
        self.out, self.cache_root = Path(out), cache_root
        self._fd: "int | None" = None

    def __enter__(self):
        import os

        from .._io import remove_stale_parts
        from .guard import environment_failure

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            env = environment_failure(exc, [self.out])
            if env is not None:
                raise env from exc
            raise
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise StudyLockedError(
                    f"{self.out}: another mriface study is writing into this folder ({holder}); wait for it "
                    "to finish, or give another --out. (Studies may share a --cache-dir.)") from None
        import time

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        n = remove_stale_parts(self.out)
        if self.cache_root is not None and not self._inside(self.cache_root):
            n += remove_stale_parts(self.cache_root, older_than_s=3600)
        self.removed = n  # run_study logs it once its log file is open
        return self

    def _inside(self, path: "Path | None") -> bool:
        return path is None or Path(path) == self.out or self.out in Path(path).parents

    def __exit__(self, *exc):
        import os

        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def input_roots(inputs: Any, photos: Any = None) -> list:
    """The study's input folders, to which paths in shareable outputs are made relative.

    The manifest's folder (or the BIDS folder) and the photographs' folder
    (or the folder of their CSV).
    """
    roots = []
    for src in (getattr(inputs, "source", None), photos):
        if src is None:
            continue
        p = Path(src).expanduser().resolve()
        roots.append(p if p.is_dir() else p.parent)
    return roots


class LogFile:
    """Attach a file handler to the ``mriface`` logger for the duration of a run."""

    def __init__(self, path: Path):
        self.path = path
        self.handler = None
        self.old_level = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("mriface")
        self.old_level = root.level
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger("mriface")
        root.removeHandler(self.handler)
        root.setLevel(self.old_level)
        self.handler.close()


def bar(iterable, total: int, desc: str, progress: bool):
    """A tqdm bar on stderr (disabled when ``progress`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="scan" if "scan" in desc else "item",
                disable=not progress, leave=True, dynamic_ncols=True)


def _postfix(b, subject: str) -> Callable[[str], None]:
    """A stage callback that shows ``subject: stage`` beside a tqdm bar."""
    return lambda name: b.set_postfix_str(f"{subject}: {name}", refresh=True)


def _fmt_timings(t: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in t.items())


@dataclass
class RunContext:
    """What one :func:`~mriface.study.run_study` call shares between its steps.

    Attributes
    ----------
    pipeline : Pipeline
        The stages.
    cache_root : Path
        The cache folder.
    images_root : Path or None
        Where renders are written as PNG (``include_images``), else None.
    progress : bool
        Show progress bars.
    problems : list of Problem
        Every problem so far, in the order found.
    computed, cached : int
        Cache entries computed in this run / read from the cache.
    executor : Executor or None
        How scans and photographs are processed (:mod:`mriface.study.executor`);
        None: one after another in this process.
    """

    pipeline: Any
    cache_root: Path
    images_root: "Path | None" = None
    progress: bool = True
    problems: list = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    executor: Any = None
    paths: Any = None  # mriface._io.PathPolicy: how paths appear in shareable outputs

    def problem(self, p: Problem) -> None:
        """Record a problem (and log it)."""
        self.problems.append(p)
        log.warning("%s", p)

    def count(self, cached: bool) -> None:
        """Count one entry as read from the cache or computed."""
        if cached:
            self.cached += 1
        else:
            self.computed += 1

    def scans(self, scans: Sequence[Scan], role: str, protocol: Any, desc: str, *,
              transform: Any = None, check: "Callable[[Any], Problem | None] | None" = None) -> list:
        """Process each scan (:func:`~mriface.study.stages.process_scan`), counting and recording problems.

        ``check(result)`` may return a further problem with a scan that
        worked (e.g. no face in any gallery render); it is recorded in turn.
        """
        from .stages import process_scan

        results = []
        if self.executor is not None:  # e.g. worker processes reconstruct the scans ahead of this loop
            process_scan = self.executor.plan(self, scans, role, protocol, transform=transform)
        b = bar(scans, len(scans), desc, self.progress)
        for scan in b:
            res = process_scan(scan, role, protocol, self.pipeline, self.cache_root,
                               images_dir=self.images_root / role if self.images_root else None,
                               transform=transform, on_stage=_postfix(b, scan.subject))
            if res.problem is None or res.cached:  # a failed scan is neither computed nor cached
                self.count(res.cached)
                if res.cached:
                    log.info("%s %s: cached", res.role, res.subject)
                else:
                    log.info("%s %s: computed (%s)", res.role, res.subject, _fmt_timings(res.timings))
            for p in getattr(res, "extra_problems", ()):  # damaged cache entries, recomputed
                self.problems.append(p)  # the guard has logged them
            if res.problem is not None:
                self.problems.append(res.problem)  # process_scan has logged it
            elif check is not None and (extra := check(res)) is not None:
                self.problem(extra)
            results.append(res)
        return results

    def photos(self, participant: str, paths: Sequence[Path]):
        """One participant's photographs aligned and embedded (:func:`~mriface.study.stages.process_photos`)."""
        if self.executor is not None:  # it may have done them while the gallery was being rendered
            return self.executor.photo(self, participant, paths)
        from .stages import process_photos

        return process_photos(participant, paths, self.pipeline, self.cache_root)
