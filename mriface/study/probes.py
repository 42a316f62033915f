"""What a study matches against its gallery: the probe sources.

A probe source turns a study's inputs into probe embeddings per participant:

* :class:`Photographs` - each participant's photographs (the published study);
* :class:`ProbeScans` - renders of other scans of the gallery subjects
  (another session, or a defaced copy listed in the manifest);
* :class:`OtherProtocol` - renders of the gallery scans themselves under
  another render protocol (other views, lights and skin);
* :class:`TransformProbes` - renders of the gallery scans after a Python
  function changed them: the hook for evaluating a defacing method in
  process. The function takes a :class:`~mriface.volume.Volume` and returns
  one (or, declared with ``on="surface"``, a
  :class:`~mriface.surface.HeadSurface`).

``run_study(..., probes=...)`` takes one of these, a plain function (made a
:class:`TransformProbes`), or a mode name from :data:`PROBE_MODES`.

Examples
--------
A defacing method is a function on a volume; the study renders its output as
the probes::

    >>> import dataclasses
    >>> from mriface.study import TransformProbes
    >>> def erase_front(vol):
    ...     data = vol.data.copy()
    ...     data[:, data.shape[1] // 2:, :] = 0   # RAS+: the front half of the head
    ...     return dataclasses.replace(vol, data=data)
    >>> probes = TransformProbes(erase_front)
    >>> probes.name, probes.on, probes.mode
    ('erase_front', 'volume', 'transform')
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import MRIFaceError, TransformError
from ..inputs import StudyInputs

__all__ = ["PROBE_MODES", "ProbeSource", "Photographs", "ProbeScans", "OtherProtocol", "TransformProbes",
           "resolve_probes"]

#: The probe modes by name (``"auto"``: photographs if given, else probe scans, else another protocol).
PROBE_MODES = ("auto", "photos", "scans", "protocol")

log = logging.getLogger("mriface.study")


class ProbeSource:
    """Base of the probe sources.

    Attributes
    ----------
    mode : str
        Short name, recorded as the summary's ``mode``.
    description : str
        What is matched against what, for the report.
    renders_scans : bool
        Whether the probes are renders (made under the study's probe protocol).
    """

    mode = ""
    description = ""
    renders_scans = True

    def check(self, inputs: StudyInputs, protocol: Any, probe_protocol: Any) -> None:
        """Raise :class:`~mriface.errors.MRIFaceError` when the study cannot run with this source."""

    def collect(self, inputs: StudyInputs, probe_protocol: Any, ctx: Any) -> "tuple[list, dict[str, list]]":
        """(per-item results, participant -> list of probe embeddings or None)."""
        raise NotImplementedError

    def options(self) -> dict:
        """Extra options for ``summary.json``."""
        return {}


class Photographs(ProbeSource):
    """Each participant's photographs (``photos=`` of :func:`~mriface.study.run_study`)."""

    mode = "photos"
    description = "photographs vs scan renders"
    renders_scans = False

    def check(self, inputs, protocol, probe_protocol):
        if not inputs.photos:
            raise MRIFaceError("probes='photos' but no usable photograph was found: give --photos DIR "
                               "with a folder per participant (see problems above)")

    def collect(self, inputs, probe_protocol, ctx):
        from .progress import bar

        results, probe_map = [], {}
        order = {sid: i for i, sid in enumerate(inputs.subjects)}  # participants in gallery order
        items = sorted(inputs.photos.items(), key=lambda kv: order.get(kv[0], len(order)))
        for participant, paths in bar(items, len(items), "photographs", ctx.progress):
            pr = ctx.photos(participant, paths)
            ctx.count(pr.cached)
            for p in pr.problems:
                ctx.problem(p)
            for path, ok in zip(pr.paths, pr.found):
                if not ok:
                    log.info("no face found in photograph %s", path)
            results.append(pr)
            probe_map[participant] = pr.probe_embeddings()
        return results, probe_map


class _Renders(ProbeSource):
    """Probes that are renders of scans: ``role`` names their cache entries, ``label`` their progress bar."""

    role = ""
    label = ""

    def scans(self, inputs: StudyInputs) -> list:
        """The scans to render as probes."""
        return inputs.gallery

    def collect(self, inputs, probe_protocol, ctx):
        results = ctx.scans(self.scans(inputs), self.role, probe_protocol, self.label,
                            transform=self if isinstance(self, TransformProbes) else None)
        probe_map: dict[str, list] = {}
        for res in results:
            probe_map.setdefault(res.subject, []).extend(res.probe_embeddings())
        return results, probe_map


class ProbeScans(_Renders):
    """Renders of the probe scans: a second BIDS session, a ``probe_scan`` column or ``probe_manifest``."""

    mode, role, label = "scans", "probe-scan", "probe scans (scans)"
    description = "renders of other scans vs gallery renders"

    def check(self, inputs, protocol, probe_protocol):
        if not inputs.probe_scans:
            raise MRIFaceError("probes='scans' but there are no probe scans: add a probe_scan column, "
                               "--probe-manifest, or a second BIDS session")

    def scans(self, inputs):
        return inputs.probe_scans


class OtherProtocol(_Renders):
    """Renders of the gallery scans themselves under the probe protocol."""

    mode, role, label = "protocol", "probe-protocol", "probe scans (protocol)"
    description = "renders under another protocol vs gallery renders"

    def check(self, inputs, protocol, probe_protocol):
        from .cache import protocol_dict

        if protocol_dict(probe_protocol) == protocol_dict(protocol):
            raise MRIFaceError("probe protocol equals the gallery protocol, so every probe would be a "
                               "gallery image: give a different --probe-seed or probe view ranges")


class TransformProbes(_Renders):
    """Renders of each gallery scan after ``fn`` changed it: the hook for defacing methods.

    Parameters
    ----------
    fn : callable
        ``fn(Volume) -> Volume`` (the default, ``on="volume"``: the result is
        reconstructed like any scan), or ``fn(HeadSurface) -> HeadSurface``
        with ``on="surface"`` (applied to the gallery scan's surface). A
        function that raises for a subject, or returns something else,
        gives a ``transform_failed`` problem for that subject, and the study
        goes on.
    name : str, optional
        Name in the report and the cache (default: the function's name).
    on : {"volume", "surface"}
        What ``fn`` takes.
    key : str, optional
        A version label for the cache. By default the cache key covers the
        function's code, the source file it is defined in, and the ``repr``
        of its default arguments and closure values; give ``key`` when the
        function depends on something else (a model file, a global setting).
    cache : bool
        Cache the transformed scans' renders (default True). Not cached, and
        recomputed in every run, when ``False`` or when the function's
        identity includes a memory address (an object without a stable ``repr``).

    Notes
    -----
    The transformed probes are rendered under the study's probe protocol
    (by default the gallery protocol with the next seed), so no probe view
    repeats a gallery view. A participant whose transformed renders show no
    face has no probe to match and counts as a miss.
    """

    mode, role = "transform", "probe-transform"

    def __init__(self, fn: Callable[[Any], Any], *, name: "str | None" = None, on: str = "volume",
                 key: "str | None" = None, cache: bool = True):
        if not callable(fn):
            raise MRIFaceError(f"TransformProbes({fn!r}): give a function of a Volume (or of a HeadSurface "
                               "with on='surface')")
        if on not in ("volume", "surface"):
            raise MRIFaceError(f"TransformProbes(on={on!r}): use 'volume' or 'surface'")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.on = on
        self.key = key
        self._identity = {"name": self.name, "on": on,
                          "version": key if key is not None else _callable_digest(fn)}
        self.cacheable = bool(cache) and " at 0x" not in repr(self._identity)
        self.description = f"renders of scans transformed by {self.name} vs gallery renders"
        self.label = f"transformed scans ({self.name})"

    def __repr__(self) -> str:
        return f"TransformProbes({self.name!r}, on={self.on!r})"

    def identity(self) -> dict:
        """JSON-able identity of the transform (part of the probes' cache keys)."""
        return dict(self._identity)

    def options(self) -> dict:
        return {"transform": self.name, "transform_on": self.on}

    def apply(self, obj: Any, scan: Any) -> Any:
        """``fn(obj)`` for one scan; any failure becomes a :class:`~mriface.errors.TransformError`."""
        from ..surface import HeadSurface

        if self.on == "volume" and isinstance(obj, HeadSurface):
            raise TransformError(f"subject {scan.subject!r}'s scan is a mesh, but transform {self.name!r} takes a "
                                 "Volume: declare it with TransformProbes(fn, on='surface')")
        try:
            out = self.fn(obj)
        except Exception as exc:  # noqa: BLE001 - a user's function may raise anything: a result, not a crash
            first = (str(exc).splitlines() or [""])[0]
            raise TransformError(f"transform {self.name!r} raised {type(exc).__name__}: {first}") from exc
        if out is None or not isinstance(out, type(obj)):
            raise TransformError(f"transform {self.name!r} returned {type(out).__name__}, "
                                 f"not a {type(obj).__name__}")
        return out



def _code_text(code) -> str:
    """A stable text of a code object and the code objects nested in it (no memory addresses)."""
    parts = [code.co_code.hex(), repr(code.co_names)]
    for c in code.co_consts:
        parts.append(_code_text(c) if inspect.iscode(c) else repr(c))
    return "|".join(parts)


def _value_text(v: Any) -> str:
    """``repr`` of a value, with arrays by their bytes (their ``repr`` elides the middle)."""
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_value_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k!r}:{_value_text(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "tobytes") and hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"array{tuple(v.shape)}{v.dtype}:{hashlib.sha256(v.tobytes()).hexdigest()}"
    return repr(v)


def _callable_digest(fn: Callable) -> str:
    """SHA-256 of what a function's results depend on, as far as Python can see."""
    parts = []
    target = fn
    while isinstance(target, functools.partial):
        parts.append(_value_text((target.args, dict(sorted(target.keywords.items())))))
        target = target.func
    code = getattr(target, "__code__", None)
    if code is None:
        parts.append(repr(target))  # a callable object: its repr says what it is (or has an address)
        code = getattr(getattr(type(target), "__call__", None), "__code__", None)
    if code is not None:
        parts.append(_code_text(code))
        try:
            parts.append(hashlib.sha256(Path(inspect.getsourcefile(target) or "").read_bytes()).hexdigest())
        except (OSError, TypeError):
            pass
    parts.append(_value_text(getattr(target, "__defaults__", None)))
    parts.append(_value_text(getattr(target, "__kwdefaults__", None)))
    for cell in getattr(target, "__closure__", None) or ():
        try:
            parts.append(_value_text(cell.cell_contents))
        except ValueError:  # an empty cell
            parts.append("<empty>")
    parts.append(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resolve_probes(probes: Any, inputs: StudyInputs) -> ProbeSource:
    """A :class:`ProbeSource` from ``run_study``'s ``probes=``: a source, a function, or a mode name."""
    if isinstance(probes, ProbeSource):
        return probes
    if callable(probes) and not isinstance(probes, str):
        return TransformProbes(probes)
    if probes not in PROBE_MODES:
        raise MRIFaceError(f"probes={probes!r} is not a probe mode: use one of {', '.join(PROBE_MODES)}, "
                           "a probe source such as TransformProbes(fn), or a function of a Volume")
    if probes == "auto":
        probes = "photos" if inputs.photos else "scans" if inputs.probe_scans else "protocol"
    return {"photos": Photographs, "scans": ProbeScans, "protocol": OtherProtocol}[probes]()

