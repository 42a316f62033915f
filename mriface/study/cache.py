"""The study's cache: keys, layout and atomic entries.

A cache entry's name carries a hash of everything its content depends on
(see :func:`key`): the scan file's bytes, the options and the source code of
the stages that made it. Arrays go into ``<stem>.npz``; the JSON sidecar
``<stem>.json`` is written last and marks the entry complete, so an entry cut
short by a killed run is simply absent.

Layout under the cache folder::

    surfaces/<subject>-<key16>.npz           a scan's HeadSurface
    renders/<subject>-<role>-<key16>.{npz,json}   renders' detections and embeddings
    photos/<participant>-<key16>.{npz,json}  a participant's photographs' embeddings
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, write_text_atomic

__all__ = ["CACHE_VERSION", "key", "code_digest", "safe_name", "protocol_dict", "with_suffix", "CacheLayout",
           "read_entry", "write_entry", "write_npz", "save_surface"]

#: Bumped whenever cached content would change for the same inputs and options.
CACHE_VERSION = 1

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
    """A subject id made safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "_"


def protocol_dict(protocol: Any) -> dict:
    """A render protocol as a plain dict (part of cache keys and entry metadata)."""
    if dataclasses.is_dataclass(protocol):
        return dataclasses.asdict(protocol)
    return dict(vars(protocol))


def with_suffix(stem: Path, suffix: str) -> Path:
    """``stem`` plus a suffix (not ``with_suffix``: subject ids may contain dots)."""
    return stem.parent / (stem.name + suffix)


class CacheLayout:
    """Paths of cache entries under one folder."""

    def __init__(self, root: "str | Path"):
        self.root = Path(root)

    def surface(self, subject: str, k: str) -> Path:
        """A surface entry (one ``.npz``)."""
        return self.root / "surfaces" / f"{safe_name(subject)}-{k[:16]}.npz"

    def renders(self, subject: str, role: str, k: str) -> Path:
        """Stem of a render entry: ``<stem>.npz`` holds arrays, ``<stem>.json`` (written last) the rest."""
        return self.root / "renders" / f"{safe_name(subject)}-{role}-{k[:16]}"

    def photos(self, participant: str, k: str) -> Path:
        """Stem of a photograph entry."""
        return self.root / "photos" / f"{safe_name(participant)}-{k[:16]}"


def write_npz(path: Path, **arrays) -> None:
    """Uncompressed ``.npz``, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_entry(stem: Path, meta: dict, **arrays) -> None:
    """Write an entry: arrays first, then the JSON sidecar that marks it complete."""
    write_npz(with_suffix(stem, ".npz"), **arrays)
    write_text_atomic(with_suffix(stem, ".json"), json.dumps(meta, indent=1, default=repr) + "\n")


def read_entry(stem: Path) -> "tuple[dict, dict] | None":
    """(meta, arrays) of a complete cache entry, or None if absent or damaged."""
    meta_path, npz_path = with_suffix(stem, ".json"), with_suffix(stem, ".npz")
    if not (meta_path.is_file() and npz_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    return meta, arrays


def save_surface(surface, path: Path) -> None:
    """:func:`mriface.surface.save_surface_npz`'s format, uncompressed.

    Compressing a 1 mm head's surface takes about 0.5 s, a tenth of the
    per-scan budget on a CPU and more than the rest of the scan's work on a
    GPU; an uncompressed entry (~12 MB for 320k triangles) writes in 0.02 s
    and :func:`mriface.surface.load_surface_npz` reads either.
    """
    write_npz(path, verts=surface.verts, faces=surface.faces, normals=surface.normals,
              center=surface.frame.center, forward=surface.frame.forward, up=surface.frame.up)

