"""Load a head scan into a :class:`Volume` in RAS+ canonical orientation.

Stage 1 of the data flow (``scan file -> Volume``).

:func:`load_volume` reads NIfTI-1/2 (``.nii``, ``.nii.gz``) and FreeSurfer
MGH/MGZ files through nibabel, picks one 3D volume, reorients the voxel axes
to RAS+ (``nibabel.as_closest_canonical``: a pure axis permutation/flip, no
interpolation), replaces non-finite voxels and decides whether the scan is MR
or CT. Anisotropic voxels are kept as they are here; surface extraction
resamples them to an isotropic grid with cubic interpolation (see
:mod:`mriface.surface`), so the volume stays the scanner's data.

A folder, a ``.dcm``/``.ima`` file or any file with DICOM's magic bytes is
read as a DICOM series by :mod:`mriface.dicom`. Before any voxel is decoded,
the size the header promises is checked against a memory limit
(:func:`check_volume_size`: ``max_volume_mb=`` or the environment variable
``MRIFACE_MAX_VOLUME_MB``, default 2048 MiB of float32 voxels), so a damaged
or hostile header is refused with a message instead of exhausting memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence
from pathlib import Path

import numpy as np

from ._scanguard import (DEFAULT_MAX_VOLUME_MB, MAX_VOLUME_ENV, check_volume_size,  # noqa: F401 (public here)
                         volume_limit_mb)
from ._scanguard import permission_denied as _permission_denied
from ._scanguard import size_text as _size_text
from .errors import InputFileError, VolumeError

__all__ = ["Volume", "load_volume", "detect_modality", "MODALITIES", "rotate_resample", "rotation_matrix",
           "check_volume_size", "volume_limit_mb", "MAX_VOLUME_ENV", "DEFAULT_MAX_VOLUME_MB"]

#: accepted values of ``modality=``
MODALITIES = ("auto", "mr", "ct")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan in world space.

    Attributes
    ----------
    data : numpy.ndarray
        float32 array of shape (X, Y, Z), voxel axes ordered so that they point
        right, anterior and superior (nibabel's RAS+ canonical reorientation).
        Finite everywhere.
    affine : numpy.ndarray
        4x4 float64 voxel-index -> world (scanner RAS+, millimetres) matrix.
    modality : str
        ``"mr"`` or ``"ct"`` (CT intensities are Hounsfield units).
    path : pathlib.Path or None
        The file it came from, for messages; None for volumes built in memory.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "mr"
    path: "Path | None" = field(default=None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (X, Y, Z)."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size along each array axis in mm, shape (3,)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def name(self) -> str:
        """A short label for messages: the file name, or ``"<in-memory volume>"``."""
        return str(self.path) if self.path is not None else "<in-memory volume>"


def detect_modality(data: np.ndarray) -> str:
    """Guess ``"ct"`` or ``"mr"`` from the intensity range.

    CT in Hounsfield units has air at about -1000 HU, so a scan whose 1st
    percentile lies below -500 is CT. MR intensities are non-negative (up to
    small interpolation undershoots) in every format we know.

    Parameters
    ----------
    data : numpy.ndarray
        Finite float array, any shape.

    Returns
    -------
    str
        ``"ct"`` or ``"mr"``.

    Examples
    --------
    >>> import numpy as np
    >>> detect_modality(np.full((4, 4, 4), -1000.0))
    'ct'
    >>> detect_modality(np.zeros((4, 4, 4)))
    'mr'
    """
    sample = np.asarray(data).ravel()[:: max(1, data.size // 200_000)]
    return "ct" if float(np.percentile(sample, 1)) < -500.0 else "mr"


def _read_image(path: Path):
    """nibabel image of ``path`` or an :class:`InputFileError` saying why not."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except PermissionError as exc:
        raise _permission_denied(path, exc) from exc
    except Exception as exc:  # nibabel raises many types for foreign files
        raise InputFileError(
            f"{path}: not a readable NIfTI (.nii/.nii.gz) or MGH/MGZ image "
            f"({type(exc).__name__}: {exc}); check the file and its extension"
        ) from exc


def _check_header_size(img, path: Path, max_volume_mb: "float | None") -> None:
    """Memory guard and a file-size check, from a nibabel image's header alone."""
    import math

    shape = tuple(int(s) for s in img.shape)
    # _read_data decodes one 3D volume of a 4D image, and every voxel of anything larger
    decoded = shape[:3] if len(shape) <= 4 else shape
    note, short = "", None
    try:  # uncompressed files: does the file hold the voxels its header promises?
        proxy = img.dataobj
        fname = img.file_map["image"].filename
        if fname is not None and not str(fname).lower().endswith((".gz", ".mgz", ".bz2", ".zst")):
            need = math.prod(int(s) for s in proxy.shape) * np.dtype(proxy.dtype).itemsize
            have = max(0, os.path.getsize(fname) - int(proxy.offset))
            if have < need:
                short = (need, have, np.dtype(proxy.dtype))
    except (AttributeError, KeyError, TypeError, ValueError, OSError):
        short = None
    if short is not None:
        note = f"; the file holds only {_size_text(short[1])} of voxel data"
    check_volume_size(path, decoded, max_volume_mb=max_volume_mb, note=note)
    if short is not None:
        need, have, dtype = short
        raise InputFileError(
            f"{path}: its header's dimensions {'x'.join(map(str, shape))} of {dtype} need "
            f"{_size_text(need)} of voxel data, but the file holds only {_size_text(have)} after its "
            "header: the file is truncated (copy or download it again) or its header is wrong")


def _read_data(img, path: Path, volume_index: "int | None") -> np.ndarray:
    """The 3D float32 array of one volume of ``img`` (not yet reoriented)."""
    shape = tuple(int(s) for s in img.shape)
    # trailing singleton axes (X, Y, Z, 1) are still one 3D volume
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(
            f"{path}: image of shape {tuple(img.shape)} is not a 3D volume "
            "(a 2D slice or a single row); give a 3D head scan"
        )
    if len(shape) > 4:
        raise VolumeError(
            f"{path}: image of shape {tuple(img.shape)} has {len(shape)} dimensions; "
            "only 3D volumes or 4D series (with volume_index=) are supported"
        )
    try:
        if len(shape) == 4:
            if volume_index is None:
                raise VolumeError(
                    f"{path}: 4D image of shape {tuple(img.shape)} holds {shape[3]} volumes; "
                    f"pick one with volume_index=0..{shape[3] - 1} (command line: --volume-index)"
                )
            if not -shape[3] <= int(volume_index) < shape[3]:
                raise VolumeError(
                    f"{path}: volume_index={volume_index} is out of range for "
                    f"{shape[3]} volumes (shape {tuple(img.shape)})"
                )
            proxy = img.dataobj
            data = np.asarray(proxy[..., int(volume_index)] if len(img.shape) == 4
                              else np.asarray(proxy).reshape(shape)[..., int(volume_index)])
        else:
            data = np.asarray(img.dataobj).reshape(shape)
    except (VolumeError, InputFileError):
        raise
    except PermissionError as exc:
        raise _permission_denied(path, exc) from exc
    except Exception as exc:  # truncated gzip, short file, bad scaling ...
        raise InputFileError(
            f"{path}: could not read the voxel data ({type(exc).__name__}: {exc}); "
            "the file is probably truncated or corrupt: copy or download it again"
        ) from exc
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise VolumeError(f"{path}: voxel type {data.dtype} is not a real number type")
    return data.astype(np.float32, copy=False)



def load_volume(
    path: "str | os.PathLike[str]",
    *,
    modality: str = "auto",
    volume_index: "int | None" = None,
    series: "int | str | None" = None,
    max_volume_mb: "float | None" = None,
) -> Volume:
    """Read a head scan and return it in RAS+ canonical orientation.

    Parameters
    ----------
    path : str or path-like
        A NIfTI (``.nii``, ``.nii.gz``) or FreeSurfer MGH/MGZ file, or a DICOM
        series: a folder of DICOM files or one multi-frame DICOM file (see
        :mod:`mriface.dicom`: largest 3D series, rescaled to HU for CT,
        sheared affine under gantry tilt).
    modality : {"auto", "mr", "ct"}
        ``"auto"`` calls CT any scan whose intensities reach the Hounsfield
        range of air (1st percentile below -500); see :func:`detect_modality`.
    volume_index : int, optional
        Which volume of a 4D series to use (negative counts from the end).
        Required for 4D input with more than one volume.
    series : int or str, optional
        For a DICOM folder holding several series: the SeriesNumber,
        SeriesInstanceUID or SeriesDescription of the one to read (default:
        the largest 3D series; :func:`mriface.dicom.find_series` lists them).
    max_volume_mb : float, optional
        Refuse, before decoding, a volume whose float32 voxels would take more
        than this many MiB. Default: the environment variable
        ``MRIFACE_MAX_VOLUME_MB``, else 2048 (see :func:`check_volume_size`).

    Returns
    -------
    Volume
        ``data`` float32 (X, Y, Z) with finite values (non-finite voxels are
        set to the smallest finite value, i.e. air), ``affine`` voxel -> world
        RAS+ mm with the voxel axes permuted/flipped to point R, A, S.

    Raises
    ------
    InputFileError
        The file is missing, not permitted to read, not an image nibabel or
        pydicom can read, or truncated (shorter than its header says).
    VolumeError
        Not 3D (2D, or 4D without ``volume_index``), constant (e.g. all zero),
        without any finite voxel, larger than the memory limit, or a DICOM
        series with a missing slice.

    Examples
    --------
    >>> from mriface import datasets
    >>> vol = load_volume(datasets.fetch("voxface"))  # doctest: +SKIP
    >>> vol.shape, vol.zooms.tolist(), vol.modality  # doctest: +SKIP
    ((93, 115, 115), [2.0, 2.0, 2.0], 'mr')
    """
    from .dicom import is_dicom_file, read_dicom

    if modality not in MODALITIES:
        raise VolumeError(f"modality={modality!r} is not one of {MODALITIES}")
    p = Path(os.fspath(path)).expanduser()
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except PermissionError as exc:  # a folder on the path may not be entered
        raise _permission_denied(p, exc) from exc
    if not exists:
        raise InputFileError(f"{p}: no such file; check the path")
    if is_dir or is_dicom_file(p):
        if volume_index is not None:
            raise VolumeError(f"{p}: volume_index= applies to 4D NIfTI/MGH files; for a DICOM series "
                              "put the one volume's files in a folder of their own")
        data, affine, _ = read_dicom(p, series=series, max_volume_mb=max_volume_mb)
    else:
        if series is not None:
            raise VolumeError(f"{p}: series= chooses a series of a DICOM folder; this is a single image file")
        img = _read_image(p)
        _check_header_size(img, p, max_volume_mb)
        data = _read_data(img, p, volume_index)
        affine = np.asarray(img.affine, dtype=np.float64)
    return _to_volume(p, data, affine, modality)


def _to_volume(p: Path, data: np.ndarray, affine: np.ndarray, modality: str) -> Volume:
    """The checks every format shares, RAS+ canonical reorientation and the modality."""
    import nibabel as nib

    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{p}: the voxel-to-world matrix (affine) is singular or not finite: {affine.tolist()}")

    finite = np.isfinite(data)
    if not finite.any():
        raise VolumeError(f"{p}: every voxel is NaN or infinite; nothing to reconstruct")
    if not finite.all():
        # non-finite voxels are almost always masked-out background: treat as air
        data = np.where(finite, data, data[finite].min()).astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise VolumeError(
            f"{p}: every voxel has the same value ({lo:g}), e.g. an all-zero volume; "
            "nothing to reconstruct"
        )

    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    data = np.ascontiguousarray(np.asarray(canon.dataobj, dtype=np.float32))
    affine = np.asarray(canon.affine, dtype=np.float64)
    mod = detect_modality(data) if modality == "auto" else modality
    return Volume(data=data, affine=affine, modality=mod, path=p)


# --------------------------------------------------------------------------- resampling
def rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (right-hand rule, world RAS+).

    Examples
    --------
    >>> rotation_matrix((0, 0, 1), 90.0).round(6) @ [1.0, 0.0, 0.0]
    array([0., 1., 0.])
    """
    import math

    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def rotate_resample(src: "str | os.PathLike[str]", dest: "str | os.PathLike[str]", *,
                    axis: Sequence[float] = (0, 0, 1), degrees: float = 12.0,
                    voxel_mm: float = 1.2) -> Path:
    """Write a copy of a scan rotated about its centre and resampled to another grid.

    The head turns by ``degrees`` about ``axis`` (world RAS+) around the
    centre of the scan's field of view, and is resampled with trilinear
    interpolation (``scipy.ndimage.affine_transform``, order 1) onto an
    axis-aligned grid of ``voxel_mm`` isotropic voxels covering the
    original field of view. A re-identification method that works on
    cohorts has to survive exactly this: other scanners, other head
    positions, other voxel sizes.

    Parameters
    ----------
    src, dest : path-like
        Input scan (NIfTI/MGH) and output ``.nii`` / ``.nii.gz`` (written atomically).
    axis : (3,) floats
        Rotation axis in world RAS+.
    degrees : float
        Rotation angle.
    voxel_mm : float
        Output voxel size, mm.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    import math

    import nibabel as nib
    from scipy import ndimage

    from ._io import atomic_path

    try:
        img = nib.load(str(src))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise InputFileError(f"cannot read scan {src}: {exc}") from exc
    while data.ndim > 3:
        data = data[..., 0]
    a_in = img.affine.astype(float)
    corners = np.array([[i, j, k, 1.0] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)]) @ a_in.T
    lo, hi = corners[:, :3].min(0), corners[:, :3].max(0)
    center = (lo + hi) / 2
    shape = tuple(int(math.ceil((hi[d] - lo[d]) / voxel_mm)) + 1 for d in range(3))
    a_out = np.eye(4)
    a_out[:3, :3] *= voxel_mm
    a_out[:3, 3] = lo
    rot = np.eye(4)
    rot[:3, :3] = rotation_matrix(axis, degrees)
    to_c, from_c = np.eye(4), np.eye(4)
    to_c[:3, 3], from_c[:3, 3] = -center, center
    # output voxel -> world -> undo the rotation -> input voxel: where to sample
    inv_rot = from_c @ np.linalg.inv(rot) @ to_c
    m = np.linalg.inv(a_in) @ inv_rot @ a_out
    out = ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape,
                                   order=1, mode="constant", cval=float(data.min()))
    dtype = np.dtype(img.get_data_dtype())
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(dtype)
    else:
        out = out.astype(np.float32)
    dest = Path(dest)
    new = nib.Nifti1Image(out, a_out)
    new.set_qform(a_out, code=1)
    new.set_sform(a_out, code=1)
    suffix = ".nii.gz" if dest.name.endswith(".gz") else ".nii"
    with atomic_path(dest) as tmp:
        target = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the name
        try:
            nib.save(new, str(target))
            os.replace(target, tmp)
        finally:
            target.unlink(missing_ok=True)
    return dest
