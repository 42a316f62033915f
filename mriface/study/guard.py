"""The one guarded unit of a study: one item's work either gives a result or a recorded problem.

Every subject's scan work (:func:`mriface.study.stages.process_scan`) and every
participant's photographs (:func:`~mriface.study.stages.process_photos`) run
inside :func:`guarded_scan` / :func:`guarded_photos`, whatever executor calls
them (sequential, streaming workers, Ray actors). Inside, ANY exception —
a bad file, a decoder's own error (``BadZipFile``, ``DecompressionBombError``),
a bug — becomes a :class:`~mriface.inputs.Problem` (kind, item, message) on
the result, its traceback goes to ``study.log``, and the study goes on.

Only environment failures stop a study (:func:`environment_failure`): no
space left, a quota, a read-only file system, or permission denied on the
output or cache folder. They raise :class:`StudyEnvironmentError`, an
:class:`~mriface.errors.MRIFaceError`: the command line prints one line and
exits 2 without printing rates, and what was finished stays in the cache.

A cache entry that fails its checks is recomputed; :func:`collect_damage`
gathers those reports during one item's work so that each becomes one
``damaged_cache_entry`` problem of that item.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import MRIFaceError, TransformError, WeightsError
from ..inputs import Problem
from .cache import collect_damage, report_damage

__all__ = ["StudyEnvironmentError", "environment_failure", "stop_on_environment_failure", "guarded_scan", "guarded_photos",
           "collect_damage", "report_damage", "ENVIRONMENT_ERRNOS"]

log = logging.getLogger("mriface.study")

#: errno values that say the machine, not the item, is at fault
ENVIRONMENT_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS,
                                           errno.ENFILE, errno.EMFILE) if e is not None)
_PERMISSION = (errno.EACCES, errno.EPERM)


class StudyEnvironmentError(MRIFaceError, OSError):
    """The machine cannot go on with the study (disk full, output folder not writable): the study stops."""


def _under(path: "str | None", roots: Sequence[Path]) -> bool:
    if not path:
        return False
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    return any(p == r or r in p.parents for r in roots)


def environment_failure(exc: BaseException, roots: Sequence["str | Path"] = ()) -> "StudyEnvironmentError | None":
    """The :class:`StudyEnvironmentError` that ``exc`` stands for, or None when it is the item's own failure.

    Parameters
    ----------
    exc : BaseException
        What an item's work raised (the cause chain is searched too).
    roots : sequence of path-like
        The folders the study writes (output, cache, images): permission
        denied there stops the study; on an input file it is that item's problem.
    """
    if isinstance(exc, StudyEnvironmentError):
        return exc
    resolved = [Path(r).resolve() for r in roots if r is not None]
    seen = set()
    e: "BaseException | None" = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            where = e.filename or e.filename2 or ""
            if e.errno in ENVIRONMENT_ERRNOS:
                what = {errno.ENOSPC: "no space left on the device",
                        errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or str(e))
                return StudyEnvironmentError(
                    f"{where or 'writing the study'}: {what} ({e.strerror}); the study stopped. "
                    "Everything finished so far is kept in the cache: free space (or fix the folder) "
                    "and run the same command again to resume")
            if e.errno in _PERMISSION and (_under(e.filename, resolved) or _under(e.filename2, resolved)):
                return StudyEnvironmentError(
                    f"{where}: permission denied: this user may not write the study's output/cache folder; "
                    "fix its permissions (ls -ld) or give another --out / --cache-dir; the study stopped")
        e = e.__cause__ or e.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return text if isinstance(exc, MRIFaceError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def _damage_problems(sink: list, subject: "str | None") -> list:
    return [Problem("damaged_cache_entry", str(entry),
                    f"cache entry {Path(entry).name} of {subject!r} failed its check ({reason}); recomputed",
                    subject) for entry, reason in sink]


def guarded_scan(work: Callable[..., Any], scan: Any, role: str, protocol: Any, pipeline: Any,
                 cache_root: "str | Path", *, failed: Callable[[Problem, int], Any], **kw) -> Any:
    """``work(scan, role, protocol, pipeline, cache_root, **kw)`` (a ScanResult), or a failed ScanResult.

    The one guarded unit of a scan: any exception becomes the result's
    ``problem`` (``transform_failed`` for a transform, else
    ``scan_failed``), except environment failures, which raise
    :class:`StudyEnvironmentError`. Damaged cache entries met on the way are
    added to the result's ``extra_problems``. ``failed(problem, dim)`` makes
    the result of a failed scan (``dim``: the embedding size, 0 if unknown).
    """
    roots = [cache_root, kw.get("images_dir")]
    with collect_damage() as sink:
        try:
            res = work(scan, role, protocol, pipeline, cache_root, **kw)
        except WeightsError:
            raise  # the face model's weights: not this scan's fault, the study cannot run (exit 2)
        except Exception as exc:  # noqa: BLE001 - the guard: any failure of one item is that item's problem
            env = environment_failure(exc, roots)
            if env is not None:
                raise env from exc
            kind = "transform_failed" if isinstance(exc, TransformError) else "scan_failed"
            problem = Problem(kind, str(scan.path),
                              f"{role} scan of subject {scan.subject!r} failed: {_first_line(exc)}", scan.subject)
            log.warning("%s", problem, exc_info=not isinstance(exc, MRIFaceError))
            try:
                dim = int(pipeline.dim)
            except Exception:  # noqa: BLE001 - the model itself may be what failed
                dim = 0
            res = failed(problem, dim)
    res.extra_problems = [*getattr(res, "extra_problems", []), *_damage_problems(sink, scan.subject)]
    return res


def guarded_photos(work: Callable[..., Any], participant: str, paths: Sequence[Path], pipeline: Any,
                   cache_root: "str | Path", *, failed: Callable[[Problem, int], Any]) -> Any:
    """``work(participant, paths, pipeline, cache_root)`` (a PhotoResult), or ``failed(problem, dim)``.

    The one guarded unit of a participant's photographs (single unreadable
    photographs are already isolated inside ``work``).
    """
    paths = [Path(p) for p in paths]
    with collect_damage() as sink:
        try:
            res = work(participant, paths, pipeline, cache_root)
        except WeightsError:
            raise  # the face model's weights: the study cannot run (exit 2)
        except Exception as exc:  # noqa: BLE001 - the guard
            env = environment_failure(exc, [cache_root])
            if env is not None:
                raise env from exc
            problem = Problem("photo_failed", ", ".join(str(p) for p in paths) or participant,
                              f"photographs of {participant!r} failed: {_first_line(exc)}", participant)
            log.warning("%s", problem, exc_info=not isinstance(exc, MRIFaceError))
            try:
                dim = int(pipeline.dim)
            except Exception:  # noqa: BLE001
                dim = 0
            res = failed(problem, dim)
    res.problems = [*res.problems, *_damage_problems(sink, participant)]
    return res


@contextlib.contextmanager
def stop_on_environment_failure(*roots: "str | Path") -> Iterator[None]:
    """Turn an environment failure anywhere in the block into :class:`StudyEnvironmentError`.

    ``run_study`` wraps its whole run in this: writing the tables, the log
    or the report on a full disk stops the study with one clear message
    (exit 2 from the command line) instead of a traceback.
    """
    try:
        yield
    except StudyEnvironmentError:
        raise
    except OSError as exc:
        env = environment_failure(exc, roots)
        if env is None:
            raise
        log.error("%s", env)
        raise env from exc
