"""File helpers: atomic writes, and the checks on every name and cell that comes from input data.

- :func:`atomic_path` and friends: a result is either complete on disk or absent;
  :func:`remove_stale_parts` removes what a killed writer left.
- :func:`safe_component` / :func:`child_path`: the one way a path is built from
  an input-derived name (a subject id): it never leaves its root.
- :func:`csv_cell` / :func:`write_csv_atomic`: every CSV cell neutralised against
  spreadsheet formula injection.
- :class:`PathPolicy`: how paths appear in shareable outputs (relative or left out).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Anything written to the yielded path appears at ``path`` only if the block
    finishes without an exception, so a killed or failed writer never leaves a
    half-written result. The parent folder is created if needed.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (d / "x.txt").read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give it the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: "str | os.PathLike[str]") -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: "str | os.PathLike[str]", text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: "str | os.PathLike[str]", data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def jsonable(obj: object) -> object:
    """``obj`` with numpy, torch and pandas values made plain for :func:`json.dumps`.

    Mappings get string keys, tuples become lists, arrays and tensors become
    (nested) lists, numpy scalars Python scalars, paths strings, and a float
    that is not finite becomes ``None`` (JSON has no NaN). The one JSON
    sanitiser of mriface: summaries, cache metadata and match results use it.

    Examples
    --------
    >>> import numpy as np
    >>> jsonable({"rate": np.float32(0.5), "ci": (np.nan, 1.0), 3: np.arange(2)})
    {'rate': 0.5, 'ci': [None, 1.0], '3': [0, 1]}
    """
    from collections.abc import Mapping

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, pandas values
        value = obj.tolist()
        return jsonable(value) if isinstance(value, (list, tuple, dict)) else _finite_or_none(value)
    return _finite_or_none(obj)


def _finite_or_none(value: object) -> object:
    """A float that is not finite becomes ``None``; anything else is returned as is."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- names from input data
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(name: object, *, max_len: int = 60) -> str:
    """``name`` (e.g. a subject id) as ONE safe file-name component.

    Characters other than ``A-Z a-z 0-9 . _ -`` become ``_``; a leading dot
    becomes ``_`` (no hidden files, no ``.``/``..``). When anything was
    changed or cut, 8 hex digits of the id's SHA-256 are appended, so that two
    ids that differ only in unsafe characters (``"P 1"``, ``"P_1"``) never
    share a file.

    Examples
    --------
    >>> safe_component("sub-01"), safe_component("../../x")[:8], safe_component("..")[:3]
    ('sub-01', '_._.._x-', '_.-')
    """
    text = str(name)
    safe = _UNSAFE_CHARS.sub("_", text)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == text and 0 < len(safe) <= max_len:
        return safe
    tag = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[:max_len - 9]}-{tag}"


def child_path(root: "str | os.PathLike[str]", *parts: "str | os.PathLike[str]") -> Path:
    """``root / parts...``, refused unless the result lies inside ``root``.

    The ONE place where a path is built from input data (subject ids,
    participant ids, file names from a manifest): callers make each
    input-derived component with :func:`safe_component`, and this check holds
    even if they did not. An absolute part, a ``..`` part, or a symlink that
    leads out of ``root`` raises :class:`~mriface.errors.ManifestError`.
    """
    from .errors import ManifestError

    root = Path(root)
    path = root.joinpath(*parts)
    for part in parts:
        p = Path(part)
        if p.is_absolute() or p.drive or any(c in ("..", "") for c in p.parts) or not str(part):
            raise ManifestError(f"{part!s}: a name from the input would leave the folder {root}; "
                                "use ids without '/', '..' or a leading '/'")
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise ManifestError(f"{path}: resolves outside {root} (a symbolic link?); refusing to write there")
    return path


# --------------------------------------------------------------------------- CSV cells
#: A cell starting with one of these is read as a formula by spreadsheets (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A text cell made inert for spreadsheets: a leading ``' `` when it starts like a formula.

    Numbers (including negative ones) are left as numbers; only strings are
    changed. Used by every CSV mriface writes (:func:`csv_safe`).

    Examples
    --------
    >>> csv_cell("=HYPERLINK(1)"), csv_cell("S1"), csv_cell(-1.5)
    ("'=HYPERLINK(1)", 'S1', -1.5)
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_safe(df):
    """A copy of a DataFrame whose text cells and column names pass through :func:`csv_cell`."""
    from pandas.api.types import is_numeric_dtype

    out = df.copy()
    for col in out.columns:
        if not is_numeric_dtype(out[col].dtype):  # object or string columns (pandas 3: "str")
            out[col] = out[col].map(csv_cell)
    out.columns = [csv_cell(str(c)) for c in out.columns]
    return out


def write_csv_atomic(df, path: "str | os.PathLike[str]") -> Path:
    """A DataFrame as CSV (no index), cells neutralised (:func:`csv_cell`), written atomically."""
    with atomic_path(path) as tmp:
        csv_safe(df).to_csv(tmp, index=False)
    return Path(path)


# --------------------------------------------------------------------------- leftovers of killed writers
def remove_stale_parts(root: "str | os.PathLike[str]", *, older_than_s: "float | None" = None) -> int:
    """Delete the temporary ``.<name>.*.part`` files that :func:`atomic_path` leaves when killed.

    Parameters
    ----------
    root : path-like
        Searched recursively (a missing folder is fine).
    older_than_s : float, optional
        Only files not modified for this many seconds (for folders another
        process may be writing into at the same time); None: all of them.

    Returns
    -------
    int
        Files removed.
    """
    import time

    root = Path(root)
    if not root.is_dir():
        return 0
    now, n = time.time(), 0
    for p in root.rglob(".*.part"):
        try:
            if p.is_file() and (older_than_s is None or now - p.stat().st_mtime > older_than_s):
                p.unlink()
                n += 1
        except OSError:
            pass  # gone already, or not ours to delete
    return n


# --------------------------------------------------------------------------- paths in shareable outputs
_ABS_PATH = re.compile(r"(?<![\w.~/-])(?:/|[A-Za-z]:[\\/])(?:[^\s'\"<>|:,;()\[\]{}]+[\\/])*"
                       r"([^\s'\"<>|:,;()\[\]{}\\/]*)")


class PathPolicy:
    """The one policy for paths in outputs meant to be shared (summary, report, tables).

    A path under one of ``roots`` (the study's input folders: the manifest's
    folder or the BIDS folder, the photographs' folder) is shown relative
    to it; ``labels`` map other folders (the output folder, the cache) to a
    fixed word; any other absolute path loses its folders (``…/name``).
    Private files (``study.log``, ``problems.csv``) keep full paths.
    """

    def __init__(self, roots=(), labels: "dict | None" = None):
        self.roots = [Path(r).resolve() for r in roots if r is not None]
        self.labels = {Path(k).resolve(): v for k, v in (labels or {}).items()}

    def path(self, p: "str | os.PathLike[str] | None") -> "str | None":
        """One path as shown in a shareable output."""
        if p is None:
            return None
        path = Path(p)
        if not path.is_absolute():
            return path.as_posix()
        for folder, label in sorted(self.labels.items(), key=lambda kv: -len(str(kv[0]))):
            if path == folder or folder in path.parents:
                rel = path.relative_to(folder).as_posix()
                return label if rel == "." else f"{label}/{rel}"
        for root in sorted(self.roots, key=lambda r: -len(str(r))):
            if path == root or root in path.parents:
                rel = path.relative_to(root).as_posix()
                return rel if rel != "." else (path.name or ".")
        return f"…/{path.name}"

    def text(self, text: str) -> str:
        """Every absolute path inside a message rewritten by :meth:`path`."""
        return _ABS_PATH.sub(lambda m: self.path(m.group(0)) or "", str(text))
