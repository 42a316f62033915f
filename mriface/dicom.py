"""Read a DICOM series (a folder of slices, or one multi-frame file) as an array and affine.

:func:`mriface.volume.load_volume` hands a folder, a ``.dcm``/``.ima`` file
or any file with DICOM's magic bytes to :func:`read_dicom`, then treats the
result like a NIfTI file's. pydicom reads the headers first, and the pixels
of the chosen series only after the memory guard
(:func:`mriface.volume.check_volume_size`).

* **Series.** Images are grouped by SeriesInstanceUID and, within it, by
  orientation, matrix, pixel spacing and echo (a localizer's three planes
  never mix). Single slices (scouts, screenshots) and stacks that repeat a
  position (time series, diffusion) are not 3D volumes. Of the rest the one
  with the most voxels is read, and when there are several a warning on the
  ``mriface.dicom`` logger names it and the others; ``load_volume(folder,
  series=...)`` reads another (:func:`find_series` lists them).
* **Geometry.** ImageOrientationPatient, PixelSpacing and the slices'
  ImagePositionPatient give the affine in DICOM's LPS mm, flipped to RAS+.
  Slices are ordered along the plane normal, not by InstanceNumber.
* **Gantry tilt.** The slice column of the affine is the real step between
  slice positions, so a tilted gantry gives a sheared affine and voxel
  centres land where the scanner measured them; nothing is resampled
  (mriface maps voxels to world through the full affine everywhere).
* **Missing or uneven slices** (a gap more than 5 % off the median, or
  positions off one line) raise :class:`~mriface.errors.VolumeError` naming
  the folder, the files on either side and the gap: interpolating across a
  missing slice would invent anatomy.
* **Intensities.** RescaleSlope/RescaleIntercept are applied per slice (per
  frame), so CT arrives in Hounsfield units and is recognised as CT.

One single-frame file is a 2D slice and is refused with a message asking
for its folder; multi-frame files (Enhanced MR/CT) with per-frame positions
are read like a folder. Compressed transfer syntaxes need pydicom's optional
decoders; without them the error says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ._scanguard import check_volume_size, permission_denied as _permission_denied
from .errors import InputFileError, VolumeError

__all__ = ["DICOM_SUFFIXES", "DicomSeries", "is_dicom_file", "is_dicom_folder", "find_series", "read_dicom",
           "folder_digest"]

log = logging.getLogger(__name__)

#: File name endings always tried as DICOM (other files are tried when they carry the magic bytes).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: DICOM patient coordinates are LPS+; mriface's world is RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A slice gap may differ from the median spacing by this fraction (or 0.02 mm) before it is an error.
_GAP_TOLERANCE = 0.05


# --------------------------------------------------------------------------- finding files
def is_dicom_file(path: "str | os.PathLike[str]") -> bool:
    """True for a file named ``*.dcm``/``*.dicom``/``*.ima`` or carrying ``DICM`` at byte 128.

    Only looks at the name and the first 132 bytes; an unreadable file is False.

    Examples
    --------
    >>> is_dicom_file("series/IM0001.dcm"), is_dicom_file("head.nii.gz")
    (True, False)
    """
    p = Path(path)
    if p.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _files(folder: Path) -> Iterator[Path]:
    """Every non-hidden file under ``folder``, in name order (recursively)."""

    def fail(exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            raise _permission_denied(Path(exc.filename or folder), exc) from exc
        raise InputFileError(f"{exc.filename or folder}: cannot list the folder ({exc})") from exc

    for root, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                yield Path(root) / name


def is_dicom_folder(path: "str | os.PathLike[str]") -> bool:
    """True when ``path`` is a folder with at least one DICOM file in it (at any depth)."""
    p = Path(path)
    try:
        return p.is_dir() and any(is_dicom_file(f) for f in _files(p))
    except (OSError, InputFileError):
        return False


def folder_digest(path: "str | os.PathLike[str]") -> str:
    """Hex SHA-256 of a folder's contents: every file's relative name and bytes, in name order.

    The identity of a DICOM folder for cache keys (a file's identity is the
    SHA-256 of its bytes); renaming, adding or changing any file changes it.
    """
    from ._io import sha256_file

    root = Path(path)
    h = hashlib.sha256()
    for f in _files(root):
        h.update(f.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


# --------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class _Slice:
    """One 2D image of a series (one file, or one frame of a multi-frame file)."""

    file: Path
    frame: "int | None"  # frame index in a multi-frame file, None for a single-frame file
    position: tuple  # ImagePositionPatient (3,), LPS mm: centre of the first transmitted pixel
    orientation: tuple  # ImageOrientationPatient (6,): row direction, column direction (LPS)
    spacing: tuple  # PixelSpacing: (between rows, between columns) mm
    rows: int
    cols: int
    slope: float
    intercept: float


@dataclass(frozen=True)
class DicomSeries:
    """One candidate 3D stack of a DICOM folder (headers only; no pixels read).

    Attributes
    ----------
    uid, number, description, modality : str, int or None, str, str
        SeriesInstanceUID, SeriesNumber, SeriesDescription ("" when absent), Modality ("MR", "CT").
    rows, cols, n_slices : int
        Image matrix (rows x columns) and the images (or frames) in the stack.
    repeated_positions : bool
        Several images share a position (a time series or diffusion): not one 3D volume.
    slices : tuple
        The images' geometry and scaling, as read from the headers.
    """

    uid: str
    number: "int | None"
    description: str
    modality: str
    rows: int
    cols: int
    n_slices: int
    repeated_positions: bool
    slices: tuple = ()

    @property
    def n_voxels(self) -> int:
        """rows x cols x slices (Python int: no overflow)."""
        return int(self.rows) * int(self.cols) * int(self.n_slices)

    @property
    def label(self) -> str:
        """``series 5 'T1 MPRAGE' (MR, 176 images of 256x256)`` for messages."""
        num = f"series {self.number}" if self.number is not None else f"series {self.uid}"
        desc = f" {self.description!r}" if self.description else ""
        many = ", repeated positions: several volumes" if self.repeated_positions else ""
        return f"{num}{desc} ({self.modality or '?'}, {self.n_slices} images of {self.rows}x{self.cols}{many})"


def _floats(value, n: int) -> "tuple | None":
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first(ds, *names: str):
    """Value of the first of ``names`` (sequence items as ``Seq.Attr``) present in ``ds``."""
    for name in names:
        obj = ds
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
                if part.endswith("Sequence"):
                    obj = obj[0]
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
        if obj is not None and obj != "":
            return obj
    return None


def _scale(group) -> "tuple[float, float]":
    slope = _first(group, "RescaleSlope", "PixelValueTransformationSequence.RescaleSlope")
    inter = _first(group, "RescaleIntercept", "PixelValueTransformationSequence.RescaleIntercept")
    try:
        s = float(slope) if slope is not None else 1.0
        b = float(inter) if inter is not None else 0.0
    except (TypeError, ValueError):
        s, b = 1.0, 0.0
    return (s if s != 0 and np.isfinite(s) else 1.0), (b if np.isfinite(b) else 0.0)


def _read_header(f: Path):
    """pydicom dataset with large values (pixels) left unread, or None when ``f`` is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # defer_size: values over 4 KiB (the pixels) are skipped, not read, but still listed, so that
        # a file cut short before its pixels is told from one that has none
        return pydicom.dcmread(f, defer_size=4096, force=f.name.lower().endswith(DICOM_SUFFIXES))
    except InvalidDicomError:
        return None
    except PermissionError as exc:
        raise _permission_denied(f, exc) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        raise InputFileError(
            f"{f}: a DICOM file whose header cannot be read ({type(exc).__name__}: {exc}); "
            "it is probably truncated or corrupt: copy the series again") from exc


def _slices_of(f: Path, ds) -> "tuple[list[_Slice], str]":
    """The 2D images in one file's header, and why none when the list is empty."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or ds.get("SOPClassUID")
    is_image = "Image Storage" in str(getattr(sop, "name", ""))
    pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if is_image and not (rows and cols and pixels):
        raise InputFileError(
            f"{f}: a DICOM {sop.name} without {'pixel data' if rows and cols else 'its image attributes'}: "
            "the file is probably truncated; copy the series again")
    if not rows or not cols or not pixels:
        return [], "no image"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return [], "a colour image"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        pos = _floats(ds.get("ImagePositionPatient"), 3)
        ori = _floats(ds.get("ImageOrientationPatient"), 6)
        spc = _floats(_first(ds, "PixelSpacing", "ImagerPixelSpacing"), 2)
        if pos is None or ori is None or spc is None:
            return [], "no position, orientation or pixel spacing"
        return [_Slice(f, None, pos, ori, spc, int(rows), int(cols), *_scale(ds))], ""
    # multi-frame (Enhanced MR/CT): geometry per frame, or shared by all frames
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    if per is None or len(per) != frames:
        return [], "a multi-frame image without per-frame positions"
    out = []
    for k, item in enumerate(per):
        groups = [g for g in (item, shared) if g is not None]

        def get(*names, _g=groups):
            for g in _g:
                v = _first(g, *names)
                if v is not None:
                    return v
            return None

        pos = _floats(get("PlanePositionSequence.ImagePositionPatient"), 3)
        ori = _floats(get("PlaneOrientationSequence.ImageOrientationPatient"), 6)
        spc = _floats(get("PixelMeasuresSequence.PixelSpacing"), 2)
        if pos is None or ori is None or spc is None:
            return [], f"frame {k + 1} has no position, orientation or pixel spacing"
        grp = next((g for g in groups if _first(g, "PixelValueTransformationSequence.RescaleSlope")
                    is not None), ds)
        out.append(_Slice(f, k, pos, ori, spc, int(rows), int(cols), *_scale(grp)))
    return out, ""


def find_series(path: "str | os.PathLike[str]") -> "tuple[list[DicomSeries], list[str]]":
    """The 3D stacks of a DICOM folder or multi-frame file, from the headers only.

    Parameters
    ----------
    path : str or path-like
        A folder (searched recursively; hidden files and DICOMDIR skipped,
        non-DICOM files ignored) or one DICOM file.

    Returns
    -------
    series : list of DicomSeries
        Stacks of two or more images, largest first.
    skipped : list of str
        One line per kind of image that is not part of any stack (scouts,
        colour screenshots, images without geometry), with a count.
    damaged : list of (str or None, InputFileError)
        Truncated or malformed files, with their SeriesInstanceUID when it
        could be read: :func:`read_dicom` raises for those of the series it
        reads (or of unknown series) and ignores the others.

    Raises
    ------
    InputFileError
        Nothing at ``path``; no DICOM file there (or only damaged ones); no permission.
    """
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except PermissionError as exc:
        raise _permission_denied(p, exc) from exc
    if not exists:
        raise InputFileError(f"{p}: no such file or folder; check the path")
    files = list(_files(p)) if is_dir else [p]
    groups: dict[tuple, list[_Slice]] = {}
    meta: dict[tuple, tuple] = {}
    skipped: dict[str, int] = {}
    n_dicom, others, damaged = 0, [], []
    for f in files:
        uid = None  # a damaged file counts against its own series only, or against every series if unknown
        try:
            ds = _read_header(f) if is_dicom_file(f) else None
            if ds is None:
                others.append(f.name)
                continue
            n_dicom += 1
            uid = str(ds.get("SeriesInstanceUID", "") or "") or None
            slices, why = _slices_of(f, ds)
            num, echo = ds.get("SeriesNumber"), str(ds.get("EchoNumbers", "") or "")
            info = (uid or "", int(num) if num not in (None, "") else None,
                    str(ds.get("SeriesDescription", "") or ""), str(ds.get("Modality", "") or ""))
        except InputFileError as exc:
            damaged.append((uid, exc))
            continue
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            damaged.append((uid, InputFileError(f"{f}: a DICOM header with a malformed value "
                                                f"({type(exc).__name__}: {exc}); copy the series again")))
            continue
        if not slices:
            skipped[why] = skipped.get(why, 0) + 1
        for s in slices:
            key = (uid, tuple(np.round(s.orientation, 3)), s.rows, s.cols, tuple(np.round(s.spacing, 4)), echo)
            groups.setdefault(key, []).append(s)
            meta.setdefault(key, info)
    if n_dicom == 0 and damaged:
        raise damaged[0][1]
    if n_dicom == 0 and not is_dir:
        raise InputFileError(f"{p}: not a DICOM file (no DICM marker and no DICOM name ending); "
                             "give a DICOM series folder, a NIfTI or an MGH/MGZ file")
    if n_dicom == 0:
        hint = ""
        scans = [o for o in others if o.lower().endswith((".nii", ".nii.gz", ".mgz", ".mgh"))]
        if scans:
            hint = f" (it holds {len(scans)} NIfTI/MGH file(s), e.g. {scans[0]}: give that file)"
        raise InputFileError(
            f"{p}: a folder without DICOM files{hint}; give a NIfTI (.nii, .nii.gz) or MGH/MGZ "
            "file, or a folder holding the DICOM files of one series")
    series = []
    for key, slices in groups.items():
        uid, number, desc, modality = meta[key]
        if len(slices) < 2:
            skipped["single 2D images (scouts or one-slice series)"] = \
                skipped.get("single 2D images (scouts or one-slice series)", 0) + 1
            continue
        n = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
        d = np.sort(np.array([np.dot(s.position, n) for s in slices]))
        repeated = bool(np.any(np.diff(d) < 1e-3))
        series.append(DicomSeries(uid, number, desc, modality, slices[0].rows, slices[0].cols,
                                  len(slices), repeated, tuple(slices)))
    series.sort(key=lambda s: (s.repeated_positions, -s.n_voxels, -s.n_slices,
                               s.number if s.number is not None else 1 << 30, s.uid))
    return series, [f"{n} {why}" for why, n in sorted(skipped.items())], damaged


def _pick(p: Path, series: "list[DicomSeries]", skipped: "list[str]", wanted) -> DicomSeries:
    if wanted is not None:
        w = str(wanted).strip()
        hits = [s for s in series if w in (s.uid, str(s.number), s.description)]
        if len(hits) != 1:
            listing = "; ".join(s.label for s in series) or "none"
            raise VolumeError(
                f"{p}: series={wanted!r} matches {len(hits)} of the 3D series here ({listing}); "
                "give a SeriesNumber, SeriesInstanceUID or SeriesDescription that names one")
        chosen = hits[0]
    else:
        volumes = [s for s in series if not s.repeated_positions]
        if not volumes:
            why = "; ".join([*(f"{s.label} repeats slice positions (several volumes)" for s in series),
                             *skipped]) or "no images with position and orientation"
            raise VolumeError(
                f"{p}: no 3D DICOM series here ({why}); give the folder of a 3D head scan, "
                "or export one volume of a time series into a folder of its own")
        chosen = volumes[0]
        if len(series) > 1:
            log.warning("%s: %d DICOM series; reading the largest, %s. Not read: %s. "
                        "To read another, give it a folder of its own or call "
                        "mriface.load_volume(path, series=<SeriesNumber>)",
                        p, len(series), chosen.label, "; ".join(s.label for s in series if s is not chosen))
    if chosen.repeated_positions:
        raise VolumeError(
            f"{p}: {chosen.label} has several images at the same slice position (a time series, "
            "diffusion or several echoes): not one 3D volume; export one volume into a folder of its own")
    return chosen


# --------------------------------------------------------------------------- geometry
def _geometry(p: Path, series: DicomSeries) -> "tuple[list[_Slice], np.ndarray]":
    """Slices in order along the plane normal, and the voxel (column, row, slice) -> RAS+ mm affine."""
    slices = list(series.slices)
    ori = np.asarray(slices[0].orientation, float)
    r, c = ori[:3], ori[3:]
    if (abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2):
        raise VolumeError(f"{p}: {series.label} has an ImageOrientationPatient {ori.tolist()} whose "
                          "directions are not unit length and perpendicular; the headers are damaged")
    n = np.cross(r, c)
    n /= np.linalg.norm(n)
    pos = np.array([s.position for s in slices], float)
    order = np.argsort(pos @ n, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    d = pos @ n
    gaps = np.diff(d)
    spacing = float(np.median(gaps))
    tol = max(0.02, _GAP_TOLERANCE * spacing)
    bad = np.flatnonzero(np.abs(gaps - spacing) > tol)
    if bad.size:
        i = int(bad[0])
        lost = gaps[i] / spacing - 1
        guess = (f"about {int(round(lost))} slice(s) missing" if lost > 0.5
                 else "uneven slice spacing")
        a, b = slices[i], slices[i + 1]
        names = f"{a.file.name}{'' if a.frame is None else f' frame {a.frame + 1}'} and " \
                f"{b.file.name}{'' if b.frame is None else f' frame {b.frame + 1}'}"
        raise VolumeError(
            f"{p}: {series.label} is not evenly spaced: slices are {spacing:.3g} mm apart, but the gap "
            f"between {names} is {gaps[i]:.3g} mm ({guess}; {len(bad)} such gap(s) in the series); "
            "copy the complete series again")
    k = np.arange(len(slices))
    step = (pos[-1] - pos[0]) / (len(slices) - 1)
    off_line = np.linalg.norm(pos - (pos[0] + k[:, None] * step), axis=1).max()
    if off_line > max(0.05, 0.02 * float(np.linalg.norm(step))):
        raise VolumeError(f"{p}: {series.label}: slice positions do not lie on one line (a slice is "
                          f"{off_line:.3g} mm off it); not one 3D volume")
    drow, dcol = slices[0].spacing
    lps = np.eye(4)
    # array axis 0 runs along a row (column index), axis 1 down the columns (row index), axis 2 over slices
    lps[:3, 0] = r * dcol
    lps[:3, 1] = c * drow
    lps[:3, 2] = step  # the real step: sheared under gantry tilt, so no resampling is needed
    lps[:3, 3] = pos[0]
    return slices, _LPS_TO_RAS @ lps


# --------------------------------------------------------------------------- pixels
def _read_pixels(f: Path) -> np.ndarray:
    """Stored pixel values of one file: (rows, cols) or (frames, rows, cols)."""
    import pydicom

    try:
        ds = pydicom.dcmread(f, force=f.name.lower().endswith(DICOM_SUFFIXES))
    except PermissionError as exc:
        raise _permission_denied(f, exc) from exc
    except Exception as exc:  # noqa: BLE001
        raise InputFileError(f"{f}: a DICOM file that cannot be read ({type(exc).__name__}: {exc}); "
                             "it is probably truncated or corrupt: copy the series again") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputFileError(f"{f}: a DICOM image without pixel data; the file is probably truncated: "
                             "copy the series again")
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and getattr(ts, "is_compressed", False) and not isinstance(exc, ValueError):
            raise InputFileError(
                f"{f}: pixel data compressed as {ts.name}, which pydicom cannot decode here "
                f"({type(exc).__name__}: {exc}); install its decoders (pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg) or decompress the series (gdcmconv --raw)") from exc
        raise InputFileError(f"{f}: cannot decode the pixel data ({type(exc).__name__}: {exc}); the file "
                             "is probably truncated or corrupt: copy the series again") from exc


def read_dicom(path: "str | os.PathLike[str]", *, series=None,
               max_volume_mb: "float | None" = None) -> "tuple[np.ndarray, np.ndarray, DicomSeries]":
    """Read one DICOM series as an array and a RAS+ affine (not yet reoriented).

    Parameters
    ----------
    path : str or path-like
        A folder of DICOM files (searched recursively) or one multi-frame DICOM file.
    series : int or str, optional
        SeriesNumber, SeriesInstanceUID or SeriesDescription; default: the
        largest 3D series (a warning names the choice when there are several).
    max_volume_mb : float, optional
        Memory limit, checked before any pixel is read (see :func:`check_volume_size`).

    Returns
    -------
    data : numpy.ndarray
        float32 (columns, rows, slices): rescaled values (CT in HU), in the
        order the affine describes.
    affine : numpy.ndarray
        4x4 float64 voxel -> world RAS+ mm. Axis 0 follows the image rows'
        direction, axis 1 the columns', axis 2 the step between slice
        positions (sheared under gantry tilt).
    chosen : DicomSeries

    Raises
    ------
    InputFileError
        No DICOM file; a truncated, corrupt or undecodable file (named); no permission.
    VolumeError
        No 3D series; a missing slice or uneven spacing (named with the gap);
        several volumes in one series; a single 2D image; too large for the memory limit.
    """
    p = Path(os.fspath(path)).expanduser()
    found, skipped, damaged = find_series(p)
    if damaged and not found:
        raise damaged[0][1]
    if p.is_file() and not found:
        raise VolumeError(
            f"{p}: one 2D DICOM image ({'; '.join(skipped) or 'a single slice'}), not a 3D volume; "
            "give the folder that holds all the slices of the series")
    chosen = _pick(p, found, skipped, series)
    for uid, exc in damaged:  # a damaged file of another series does not stop this one
        if uid is None or uid == chosen.uid:
            raise exc
    check_volume_size(p, (chosen.cols, chosen.rows, chosen.n_slices),
                      max_volume_mb=max_volume_mb, what=chosen.label)
    slices, affine = _geometry(p, chosen)
    data = np.empty((chosen.cols, chosen.rows, len(slices)), np.float32)
    decoded: dict[Path, np.ndarray] = {}
    for k, s in enumerate(slices):
        if s.file not in decoded:
            decoded = {s.file: _read_pixels(s.file)}  # keep one file: multi-frame files hold all frames
        arr = decoded[s.file]
        if s.frame is not None and arr.ndim == 3:
            arr = arr[s.frame]
        if arr.shape != (s.rows, s.cols):
            raise InputFileError(f"{s.file}: pixel data of shape {arr.shape} where the header says "
                                 f"{s.rows}x{s.cols}; the file is damaged: copy the series again")
        data[:, :, k] = (arr.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)).T
    return data, affine, chosen

