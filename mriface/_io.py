"""Atomic file writing: a result is either complete on disk or absent."""

from __future__ import annotations

import contextlib
import hashlib
import os
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
