"""The study's cache: keys, layout and verified entries.

A cache entry's name carries a hash of everything its content depends on
(see :func:`key`): the scan file's bytes, the subject id (renders draw their
cameras from it), the options and the source code of the stages that made
it. Arrays go into ``<stem>.npz``; the JSON sidecar ``<stem>.json`` is
written last and marks the entry complete, so an entry cut short by a
killed run is simply absent.

No entry is trusted blindly: the sidecar records each array's shape, dtype
and SHA-256, and a digest of the sidecar itself. :func:`read_entry` checks
all of it (and the caller's expected shapes); an entry that is truncated,
empty, malformed, hand-altered, pickled or of an older format is reported
as damaged, and the caller recomputes it and says so.

Layout under the cache folder (``<subject>`` is :func:`mriface._io.safe_component`)::

    surfaces/<subject>-<key16>.{npz,json}        a scan's HeadSurface
    renders/<subject>-<role>-<key16>.{npz,json}  renders' detections and embeddings
    photos/<participant>-<key16>.{npz,json}      a participant's photographs' embeddings
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .._io import atomic_path, child_path, safe_component, write_text_atomic

__all__ = ["CACHE_VERSION", "key", "code_digest", "safe_name", "protocol_dict", "with_suffix", "CacheLayout",
           "read_entry", "check_entry", "write_entry", "write_npz", "save_surface", "load_surface", "Damaged", "array_digest", "collect_damage", "report_damage"]

log = logging.getLogger("mriface.study")

#: Bumped whenever cached content or its format would change for the same inputs and options
#: (2: embeddings in one entry per face model; 3: verified entries with shapes and digests,
#: subject id and role in render keys).
CACHE_VERSION = 3

_PACKAGE = Path(__file__).resolve().parents[1]


def key(obj: Any) -> str:
    """SHA-256 of a JSON rendering of ``obj`` (sorted keys): a cache key."""
    text = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def code_digest(*modules: str) -> str:
    """SHA-256 of the source of mriface modules or packages (e.g. ``"surface"``, ``"render"``).

    Part of every cache key, so that results computed by another version of
    a stage are never reused: after an upgrade the cache simply misses.
    """
    h = hashlib.sha256()
    for name in modules:
        target = _PACKAGE / name
        files = sorted(target.rglob("*.py")) if target.is_dir() else [_PACKAGE / f"{name}.py"]
        for f in files:
            if f.is_file():
                h.update(f.relative_to(_PACKAGE).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def safe_name(name: str) -> str:
    """A subject id made safe as one file-name component (:func:`mriface._io.safe_component`)."""
    return safe_component(name)


def protocol_dict(protocol: Any) -> dict:
    """A render protocol as a plain dict (part of cache keys and entry metadata)."""
    if dataclasses.is_dataclass(protocol):
        return dataclasses.asdict(protocol)
    return dict(vars(protocol))


def with_suffix(stem: Path, suffix: str) -> Path:
    """``stem`` plus a suffix (not ``with_suffix``: subject ids may contain dots)."""
    return stem.parent / (stem.name + suffix)


class CacheLayout:
    """Paths of cache entries under one folder (every id-derived name checked by :func:`~mriface._io.child_path`)."""

    def __init__(self, root: "str | Path"):
        self.root = Path(root)

    def surface(self, subject: str, k: str) -> Path:
        """Stem of a surface entry."""
        return child_path(self.root, "surfaces", f"{safe_name(subject)}-{k[:16]}")

    def renders(self, subject: str, role: str, k: str) -> Path:
        """Stem of a render entry: ``<stem>.npz`` holds arrays, ``<stem>.json`` (written last) the rest."""
        return child_path(self.root, "renders", f"{safe_name(subject)}-{safe_name(role)}-{k[:16]}")

    def photos(self, participant: str, k: str) -> Path:
        """Stem of a photograph entry."""
        return child_path(self.root, "photos", f"{safe_name(participant)}-{k[:16]}")


_damage: "contextvars.ContextVar[list | None]" = contextvars.ContextVar("mriface_cache_damage", default=None)


@contextlib.contextmanager
def collect_damage() -> Iterator[list]:
    """Collect ``(entry, reason)`` reports of damaged cache entries made during the block (one item's work)."""
    sink: list = []
    token = _damage.set(sink)
    try:
        yield sink
    finally:
        _damage.reset(token)


def report_damage(entry: Path, reason: str) -> None:
    """A cache entry failed its checks and will be recomputed: log it, and note it for the item's problems."""
    log.warning("cache entry %s is damaged (%s); recomputing", entry, reason)
    sink = _damage.get()
    if sink is not None:
        sink.append((entry, reason))


class Damaged(Exception):
    """A cache entry failed its checks (the message says which); the caller recomputes it."""


def array_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _meta_digest(meta: Mapping) -> str:
    body = {k: v for k, v in meta.items() if k != "entry_sha256"}
    return key(json.loads(json.dumps(body, default=repr)))


def write_npz(path: Path, **arrays) -> None:
    """Uncompressed ``.npz``, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_entry(stem: Path, meta: dict, **arrays) -> None:
    """Write an entry: arrays first, then the JSON sidecar (shapes, digests) that marks it complete."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for suffix in (".npz", ".json"):  # an empty folder where a damaged entry's file was: out of the way
        p = with_suffix(stem, suffix)
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            p.rmdir()
    write_npz(with_suffix(stem, ".npz"), **arrays)
    meta = dict(meta)
    meta["cache_version"] = CACHE_VERSION
    meta["arrays"] = {k: {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": array_digest(a)}
                      for k, a in arrays.items()}
    meta["entry_sha256"] = _meta_digest(meta)
    write_text_atomic(with_suffix(stem, ".json"), json.dumps(meta, indent=1, default=repr) + "\n")


def read_entry(stem: Path, expect: "Mapping[str, tuple] | None" = None) -> "tuple[dict, dict] | None":
    """(meta, arrays) of a complete, intact cache entry; None if absent or damaged.

    Parameters
    ----------
    stem : Path
        The entry (without ``.npz``/``.json``).
    expect : mapping, optional
        Array name -> expected shape (``None`` in a dimension: any size).

    Returns
    -------
    tuple or None
        None when the entry is absent, or when it fails a check: an
        unreadable or malformed sidecar, truncated/empty/pickled/altered
        arrays, wrong shapes, an older format. Any exception while reading
        counts (``BadZipFile``, ``EOFError``, ...). A damaged entry is
        reported (:func:`report_damage`: logged, and a
        ``damaged_cache_entry`` problem of the item) and the caller recomputes it.
    """
    try:
        return check_entry(stem, expect)
    except Damaged as exc:
        report_damage(stem, str(exc))
        return None


def check_entry(stem: Path, expect: "Mapping[str, tuple] | None" = None) -> "tuple[dict, dict] | None":
    """:func:`read_entry`, raising :class:`Damaged` instead of reporting it."""
    meta_path, npz_path = with_suffix(stem, ".json"), with_suffix(stem, ".npz")
    if not meta_path.is_file():
        if meta_path.exists() or meta_path.is_symlink():
            raise Damaged("the sidecar is not a plain file")
        return None  # absent, or arrays without their sidecar: a run killed between the two writes
    try:
        return _verified(meta_path, npz_path, expect)
    except Damaged:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, the answer is "recompute"
        raise Damaged(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc


def _verified(meta_path: Path, npz_path: Path, expect) -> "tuple[dict, dict]":
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise Damaged(f"sidecar holds a {type(meta).__name__}, not an object")
    if meta.get("cache_version") != CACHE_VERSION or not isinstance(meta.get("arrays"), dict):
        raise Damaged(f"format {meta.get('cache_version')!r}, not {CACHE_VERSION} (written by another version)")
    if meta.get("entry_sha256") != _meta_digest(meta):
        raise Damaged("sidecar digest does not match its content (altered by hand?)")
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    recorded = meta["arrays"]
    if set(arrays) != set(recorded):
        raise Damaged(f"arrays {sorted(arrays)} differ from those recorded {sorted(recorded)}")
    for name, a in arrays.items():
        r = recorded[name]
        if list(a.shape) != list(r.get("shape", [])) or a.dtype.str != r.get("dtype"):
            raise Damaged(f"array {name!r} is {a.dtype.str}{list(a.shape)}, recorded {r.get('dtype')}{r.get('shape')}")
        if array_digest(a) != r.get("sha256"):
            raise Damaged(f"array {name!r} does not match its recorded SHA-256 (altered?)")
    for name, shape in (expect or {}).items():
        a = arrays.get(name)
        if a is None or a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
            got = None if a is None else list(a.shape)
            raise Damaged(f"array {name!r} has shape {got}, expected {list(shape)}")
    return meta, arrays


def save_surface(surface, stem: Path) -> None:
    """A HeadSurface as a verified entry, uncompressed.

    Compressing a 1 mm head's surface takes about 0.5 s, a tenth of the
    per-scan budget on a CPU and more than the rest of the scan's work on a
    GPU; an uncompressed entry (~12 MB for 320k triangles) writes in 0.02 s.
    """
    write_entry(stem, {"kind": "surface"}, verts=surface.verts, faces=surface.faces, normals=surface.normals,
                center=surface.frame.center, forward=surface.frame.forward, up=surface.frame.up)


def load_surface(stem: Path):
    """The HeadSurface of a verified surface entry; None if absent or damaged (reported, as :func:`read_entry`)."""
    from ..surface import FaceFrame, HeadSurface

    entry = read_entry(stem, {"verts": (None, 3), "faces": (None, 3), "normals": (None, 3),
                              "center": (3,), "forward": (3,), "up": (3,)})
    if entry is None:
        return None
    _, a = entry
    n = a["verts"].shape[0]
    try:
        if a["normals"].shape[0] != n or (a["faces"].size and (a["faces"].min() < 0 or a["faces"].max() >= n)):
            raise Damaged("faces index vertices that are not there, or normals do not match the vertices")
        return HeadSurface(a["verts"], a["faces"], a["normals"], FaceFrame(a["center"], a["forward"], a["up"]))
    except Exception as exc:  # noqa: BLE001 - a surface that does not hold together is recomputed
        report_damage(stem, str(exc) if isinstance(exc, Damaged) else f"not a surface: {exc}")
        return None
