"""A study run's bookkeeping: its log file, progress bars, and what was computed, cached or failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..inputs import Problem, Scan

__all__ = ["LogFile", "bar", "RunContext"]

log = logging.getLogger("mriface.study")


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
