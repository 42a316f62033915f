"""Guards shared by every scan reader: the memory limit and the "permission denied" message.

:mod:`mriface.volume` (NIfTI, MGH) and :mod:`mriface.dicom` both check the
size a header promises with :func:`check_volume_size` before decoding a
voxel, and word a permission error the same way. The public names are
re-exported by :mod:`mriface.volume`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputFileError, VolumeError

__all__ = ["MAX_VOLUME_ENV", "DEFAULT_MAX_VOLUME_MB", "volume_limit_mb", "check_volume_size",
           "permission_denied", "size_text"]


def permission_denied(path: Path, exc: OSError) -> InputFileError:
    """The one message for a scan this user may not read (file or a folder above it)."""
    return InputFileError(
        f"{path}: permission denied: this user may not read it ({exc.strerror or exc}); "
        "check the permissions of the file and of the folders above it (ls -l), "
        "or run as a user who can read it")


#: environment variable holding the memory limit of :func:`check_volume_size`, in MiB
MAX_VOLUME_ENV = "MRIFACE_MAX_VOLUME_MB"
#: default limit on one decoded volume: 2 GiB of float32 voxels (512 Mi voxels, e.g. 512x512x2048
#: CT slices); loading and reorienting briefly hold about three times as much
DEFAULT_MAX_VOLUME_MB = 2048.0


def volume_limit_mb(max_volume_mb: "float | None" = None) -> float:
    """The memory limit in MiB: ``max_volume_mb``, else ``$MRIFACE_MAX_VOLUME_MB``, else 2048."""
    value, source = max_volume_mb, "max_volume_mb"
    if value is None:
        raw = os.environ.get(MAX_VOLUME_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_VOLUME_MB
        value, source = raw, MAX_VOLUME_ENV
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = float("nan")
    if not mb > 0 or mb == float("inf"):
        raise VolumeError(f"{source}={value!r} is not a positive number of MiB; "
                          f"give e.g. 8192, or unset {MAX_VOLUME_ENV} for the default {DEFAULT_MAX_VOLUME_MB:g}")
    return mb


def size_text(n: int) -> str:
    """Bytes in binary units for messages: ``'2 GiB'``, ``'101 TiB'``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_volume_size(path, shape, *, max_volume_mb: "float | None" = None,
                      what: str = "its header", note: str = "") -> None:
    """Refuse a volume whose decoded float32 voxels would exceed the memory limit.

    Called with the dimensions a header promises, before any voxel is
    decoded, so that a damaged header (or a scan far larger than a head)
    becomes a :class:`~mriface.errors.VolumeError` naming the file, the size
    and the limit, not an out-of-memory crash.

    Parameters
    ----------
    path : path-like
        The scan, for the message.
    shape : sequence of int
        Voxel counts that will be decoded.
    max_volume_mb : float, optional
        Limit in MiB of float32 voxels; default ``$MRIFACE_MAX_VOLUME_MB`` or 2048.
    what : str
        What promises the shape (``"its header"``, a DICOM series label).
    note : str
        Added to the message (e.g. that the file is far too short for the header).

    Examples
    --------
    >>> check_volume_size("head.nii", (256, 256, 256))
    >>> check_volume_size("bad.nii", (30000, 30000, 30000))
    Traceback (most recent call last):
    ...
    mriface.errors.VolumeError: bad.nii: its header claims 30000x30000x30000 voxels (2.7e+13), ...
    """
    import math

    dims = [int(s) for s in shape]
    count = math.prod(dims)  # Python ints: no overflow for absurd headers
    need = 4 * count
    limit_mb = volume_limit_mb(max_volume_mb)
    limit = int(limit_mb * 2**20)
    if need > limit:
        raise VolumeError(
            f"{path}: {what} claims {'x'.join(map(str, dims))} voxels ({count:.3g}), which would take "
            f"{size_text(need)} of memory as float32, more than the limit of {size_text(limit)}"
            f"{note}. If the scan really is that large, raise the limit: max_volume_mb= or the "
            f"environment variable {MAX_VOLUME_ENV} (MiB), e.g. {MAX_VOLUME_ENV}="
            f"{max(int(2 ** math.ceil(math.log2(need / 2**20 + 1))), 1)}; otherwise the header is damaged")
