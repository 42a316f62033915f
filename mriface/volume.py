"""Load a head scan into a :class:`Volume` in RAS+ canonical orientation.

Stage 1 of the data flow (``scan file -> Volume``).

:func:`load_volume` reads NIfTI-1/2 (``.nii``, ``.nii.gz``) and FreeSurfer
MGH/MGZ files through nibabel, picks one 3D volume, reorients the voxel axes
to RAS+ (``nibabel.as_closest_canonical``: a pure axis permutation/flip, no
interpolation), replaces non-finite voxels and decides whether the scan is MR
or CT. Anisotropic voxels are kept as they are here; surface extraction
resamples them to an isotropic grid with cubic interpolation (see
:mod:`mriface.surface`), so the volume stays the scanner's data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFileError, VolumeError

__all__ = ["Volume", "load_volume", "detect_modality", "MODALITIES"]

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
    except Exception as exc:  # nibabel raises many types for foreign files
        raise InputFileError(
            f"{path}: not a readable NIfTI (.nii/.nii.gz) or MGH/MGZ image "
            f"({type(exc).__name__}: {exc}); check the file and its extension"
        ) from exc


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
) -> Volume:
    """Read a head scan and return it in RAS+ canonical orientation.

    Parameters
    ----------
    path : str or path-like
        A NIfTI (``.nii``, ``.nii.gz``) or FreeSurfer MGH/MGZ file.
    modality : {"auto", "mr", "ct"}
        ``"auto"`` calls CT any scan whose intensities reach the Hounsfield
        range of air (1st percentile below -500); see :func:`detect_modality`.
    volume_index : int, optional
        Which volume of a 4D series to use (negative counts from the end).
        Required for 4D input with more than one volume.

    Returns
    -------
    Volume
        ``data`` float32 (X, Y, Z) with finite values (non-finite voxels are
        set to the smallest finite value, i.e. air), ``affine`` voxel -> world
        RAS+ mm with the voxel axes permuted/flipped to point R, A, S.

    Raises
    ------
    InputFileError
        The file is missing, not an image nibabel can read, or truncated.
    VolumeError
        Not 3D (2D, or 4D without ``volume_index``), constant (e.g. all zero),
        or without any finite voxel.

    Examples
    --------
    >>> from mriface import datasets
    >>> vol = load_volume(datasets.fetch("voxface"))  # doctest: +SKIP
    >>> vol.shape, vol.zooms.tolist(), vol.modality  # doctest: +SKIP
    ((93, 115, 115), [2.0, 2.0, 2.0], 'mr')
    """
    import nibabel as nib

    if modality not in MODALITIES:
        raise VolumeError(f"modality={modality!r} is not one of {MODALITIES}")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise InputFileError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputFileError(f"{p}: is a folder, not an image file; give a .nii, .nii.gz, .mgh or .mgz file")
    img = _read_image(p)
    data = _read_data(img, p, volume_index)
    affine = np.asarray(img.affine, dtype=np.float64)
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
