"""Find a study's scans and photographs, and say clearly what is wrong with them.

A study's inputs come in one of two shapes:

* a **manifest**: a CSV with one row per subject, naming the subject and the
  scan file (relative paths are relative to the manifest's folder), and
  optionally a second scan per subject used as a scan-to-scan probe (for
  example the same scan after defacing);
* a **BIDS dataset**: ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` or ``*_FLAIR``;
  the first session of each subject is the gallery scan and the next
  session, when there is one, a scan-to-scan probe.

Photographs are a folder per participant (``PHOTOS/<participant>/*.jpg``) or a
CSV of (participant, path) rows.

Problems with single rows or files do not stop a study: each becomes a
:class:`Problem` (one line naming the row or file and the fix), the rest goes
ahead, and the study counts the problems in its summary. Only a source that
cannot be read at all raises :class:`~mriface.errors.ManifestError`.

This module is over 500 lines because the three input shapes (manifest, BIDS,
photographs) share its row-level checks and problem wording (missing,
unreadable, permission denied, skipped files); each part is a short function.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import ManifestError
from .scans import load_scan  # how a manifest row's file is read (a volume or a mesh)

__all__ = [
    "Problem",
    "Scan",
    "StudyInputs",
    "SCAN_SUFFIXES",
    "PHOTO_SUFFIXES",
    "load_scan",
    "read_manifest",
    "discover_bids",
    "is_bids",
    "read_photos",
    "load_inputs",
]

#: File name endings taken for scans (case-insensitive).
SCAN_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
#: File name endings taken for photographs in a participant's folder (case-insensitive).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Accepted column names, lower-cased, first match wins.
_SUBJECT_COLUMNS = ("subject", "subject_id", "participant", "participant_id", "id")
_SCAN_COLUMNS = ("scan", "scan_path", "path", "file", "image")
_PROBE_COLUMNS = ("probe_scan", "probe", "probe_path", "defaced", "scan2")
_PHOTO_COLUMNS = ("photo", "photograph", "path", "file", "image")


@dataclass(frozen=True)
class Problem:
    """One bad input, reported and counted, never fatal to the study.

    Attributes
    ----------
    kind : str
        A short machine-readable category, e.g. ``"missing_scan"``,
        ``"duplicate_subject"``, ``"unknown_participant"``,
        ``"empty_photo_folder"``, ``"unreadable_photo"``, ``"scan_failed"``,
        ``"no_face_in_renders"``.
    where : str
        The row or file at fault (``"manifest.csv line 4"``, a path).
    message : str
        One line: what is wrong and what to do.
    subject : str or None
        The subject or participant concerned, when known.
    """

    kind: str
    where: str
    message: str
    subject: "str | None" = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Scan:
    """One scan of one subject.

    Attributes
    ----------
    subject : str
        Subject id (the gallery label; a participant's photographs match it).
    path : pathlib.Path
        Absolute path of the scan file.
    session : str or None
        BIDS session label (``"ses-2"``) or manifest column, for messages.
    where : str
        Where it was listed (``"manifest.csv line 3"``), for messages.
    """

    subject: str
    path: Path
    session: "str | None" = None
    where: str = ""


@dataclass
class StudyInputs:
    """Everything a study runs on, with the problems found while reading it.

    Attributes
    ----------
    gallery : list of Scan
        One scan per subject, in input order; subject ids are unique.
    probe_scans : list of Scan
        Scan-to-scan probes: other scans of gallery subjects (another session,
        a defaced copy). Empty unless the source provides them.
    photos : dict
        participant id -> list of photograph paths (each readable as an
        image), only for participants with a gallery scan.
    problems : list of Problem
        Every bad row, file or folder found.
    source : pathlib.Path or None
        The manifest or BIDS folder read.
    """

    gallery: list[Scan]
    probe_scans: list[Scan] = field(default_factory=list)
    photos: dict[str, list[Path]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    source: "Path | None" = None

    @property
    def subjects(self) -> list[str]:
        """Gallery subject ids in input order."""
        return [s.subject for s in self.gallery]


# --------------------------------------------------------------------------- helpers
def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _pick_column(header: Sequence[str], names: Sequence[str]) -> "str | None":
    lowered = {h.strip().lower(): h for h in header}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV with their 1-based line numbers (header is line 1)."""
    if not path.is_file():
        raise ManifestError(f"{path}: no such file; give the path of a CSV manifest or a BIDS folder")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, dict(r)) for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: not a readable UTF-8 CSV file ({exc}); save it as CSV") from exc
    if not header:
        raise ManifestError(f"{path}: empty file; a manifest needs a header row such as 'subject,scan'")
    return header, rows


def _resolve(value: str, base: Path) -> Path:
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else (base / p)


def _is_dicom_folder(path: Path) -> bool:
    """A folder that holds DICOM files is a scan: one series, read by :mod:`mriface.dicom`."""
    from .dicom import is_dicom_folder

    return is_dicom_folder(path)


def _scan_path_problem(path: Path) -> "tuple[str, str] | None":
    """None when ``path`` is a scan file or a DICOM folder; else (problem kind, what is wrong).

    On Python 3.11 ``Path.is_file()`` raises ``PermissionError`` when a folder
    on the way cannot be entered: that is this row's problem, not the study's.
    """
    try:
        if path.is_file() or _is_dicom_folder(path):
            return None
        if path.is_dir():
            return "missing_scan", "is a folder without DICOM files; give a scan file or a folder of one DICOM series"
        return "missing_scan", "does not exist; fix the path"
    except PermissionError as exc:
        return "unreadable_scan", (f"cannot be reached: permission denied ({exc.strerror or exc}); check the "
                                   "permissions of the file and of the folders above it (ls -ld)")
    except (OSError, ValueError) as exc:  # e.g. a name too long, a NUL byte, a symlink loop
        return "unreadable_scan", f"cannot be reached ({getattr(exc, 'strerror', None) or exc}); fix the path"


def _is_file(path: Path) -> bool:
    """``path.is_file()`` that says False instead of raising (permission denied on a folder above, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _bids_label(name: str) -> str:
    """``"sub-01"`` -> ``"01"``; other names unchanged (for matching photo folders)."""
    return name[4:] if name.startswith("sub-") else name


# --------------------------------------------------------------------------- manifests
def read_manifest(path: "str | Path") -> tuple[list[Scan], list[Scan], list[Problem]]:
    """Read a scan manifest CSV.

    Columns (names case-insensitive): a subject id (``subject``,
    ``subject_id``, ``participant``, ``participant_id`` or ``id``), a scan
    path (``scan``, ``scan_path``, ``path``, ``file`` or ``image``) and
    optionally a probe scan (``probe_scan``, ``probe``, ``probe_path``,
    ``defaced`` or ``scan2``) for scan-to-scan studies. Relative paths resolve
    against the manifest's folder.

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    gallery : list of Scan
        Valid rows, first occurrence of each subject id.
    probe_scans : list of Scan
        Valid probe-scan cells of the kept rows.
    problems : list of Problem
        ``missing_scan``, ``duplicate_subject``, ``empty_row`` and
        ``missing_probe_scan`` problems, one per bad row or cell.

    Raises
    ------
    ManifestError
        The file is missing, not CSV, or lacks a subject or scan column.
    """
    path = Path(path).expanduser().resolve()
    header, rows = _read_csv(path)
    subj_col = _pick_column(header, _SUBJECT_COLUMNS)
    scan_col = _pick_column(header, _SCAN_COLUMNS)
    probe_col = _pick_column(header, _PROBE_COLUMNS)
    if subj_col is None or scan_col is None:
        raise ManifestError(
            f"{path}: header {','.join(header)!r} lacks a subject column "
            f"({'/'.join(_SUBJECT_COLUMNS)}) or a scan column ({'/'.join(_SCAN_COLUMNS)}); "
            "write a header such as 'subject,scan'"
        )
    base = path.parent
    gallery: list[Scan] = []
    probes: list[Scan] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for line, row in rows:
        where = f"{path.name} line {line}"
        subject = (row.get(subj_col) or "").strip()
        scan_value = (row.get(scan_col) or "").strip()
        if not subject and not scan_value:
            continue  # blank line
        if not subject or not scan_value:
            problems.append(Problem("empty_row", where, f"needs both a {subj_col} and a {scan_col}; "
                                    "fill in the missing cell or delete the row", subject or None))
            continue
        if subject in seen:
            problems.append(Problem(
                "duplicate_subject", where,
                f"subject id {subject!r} was already listed at {seen[subject]}; the row is skipped. "
                "Give each subject one row (put a second scan in a probe_scan column)", subject))
            continue
        seen[subject] = where
        scan_path = _resolve(scan_value, base)
        bad = _scan_path_problem(scan_path)
        if bad is not None:
            kind, what = bad
            problems.append(Problem(
                kind, where,
                f"scan {scan_path} of subject {subject!r} {what} "
                "(relative paths are relative to the manifest's folder)", subject))
            continue
        gallery.append(Scan(subject, scan_path.resolve(), None, where))
        if probe_col is not None:
            probe_value = (row.get(probe_col) or "").strip()
            if probe_value:
                probe_path = _resolve(probe_value, base)
                bad = _scan_path_problem(probe_path)
                if bad is None:
                    probes.append(Scan(subject, probe_path.resolve(), probe_col, where))
                else:
                    problems.append(Problem(
                        "missing_probe_scan", where,
                        f"{probe_col} {probe_path} of subject {subject!r} {bad[1]}", subject))
    if not gallery and not problems:
        raise ManifestError(f"{path}: no rows; add one row per subject (subject,scan)")
    return gallery, probes, problems


def read_probe_manifest(path: "str | Path", subjects: Iterable[str]) -> tuple[list[Scan], list[Problem]]:
    """Read a second manifest whose scans are probes of gallery subjects.

    Same format as :func:`read_manifest`. Rows for subjects not in the gallery
    become ``unknown_participant`` problems.
    """
    scans, extra, problems = read_manifest(path)
    known = set(subjects)
    kept = []
    for s in [*scans, *extra]:
        if s.subject in known:
            kept.append(s)
        else:
            problems.append(Problem(
                "unknown_participant", s.where,
                f"probe scan of subject {s.subject!r}, who has no gallery scan; "
                "add the subject to the gallery manifest or drop the row", s.subject))
    return kept, problems


# --------------------------------------------------------------------------- BIDS
def is_bids(path: "str | Path") -> bool:
    """True when ``path`` is a folder with ``dataset_description.json`` or ``sub-*`` folders."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / "dataset_description.json").is_file() or any(
        c.is_dir() and c.name.startswith("sub-") for c in p.iterdir())


def _bids_scans(anat: Path, suffixes: Sequence[str]) -> list[Path]:
    found = []
    for suffix in suffixes:
        hits = sorted(f for f in anat.iterdir()
                      if f.is_file() and re.search(rf"_{suffix}\.nii(\.gz)?$", f.name))
        found.extend(hits)
    return found


def discover_bids(root: "str | Path", *, suffixes: Sequence[str] = ("T1w", "FLAIR"),
                  ) -> tuple[list[Scan], list[Scan], list[Problem]]:
    """Find one gallery scan (and maybe one probe scan) per subject in a BIDS dataset.

    Scans are ``sub-<label>/[ses-<label>/]anat/*_<suffix>.nii[.gz]``. Within
    a session the first suffix in ``suffixes`` that has a file wins (then
    the first file in name order, e.g. ``run-1``). The subject's first
    session in name order gives the gallery scan, the second (if any) the
    scan-to-scan probe.

    Parameters
    ----------
    root : str or Path
        The dataset folder.
    suffixes : sequence of str
        BIDS suffixes to accept, in order of preference.

    Returns
    -------
    gallery, probe_scans, problems
        As :func:`read_manifest`; subject ids are the folder names (``"sub-01"``).
        A subject without any matching scan is a ``missing_scan`` problem.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"{root}: no such folder; give a BIDS dataset folder or a manifest CSV")
    subjects = sorted(c for c in root.iterdir() if c.is_dir() and c.name.startswith("sub-"))
    if not subjects:
        raise ManifestError(f"{root}: no sub-* folders; is this a BIDS dataset? "
                            "Otherwise give a manifest CSV (subject,scan)")
    gallery: list[Scan] = []
    probes: list[Scan] = []
    problems: list[Problem] = []
    for sub in subjects:
        sessions = sorted(c for c in sub.iterdir() if c.is_dir() and c.name.startswith("ses-"))
        per_session: list[tuple[str | None, Path]] = []
        for ses in (sessions or [None]):
            anat = (ses if ses is not None else sub) / "anat"
            if anat.is_dir():
                hits = _bids_scans(anat, suffixes)
                if hits:
                    per_session.append((ses.name if ses is not None else None, hits[0]))
        if not per_session:
            problems.append(Problem(
                "missing_scan", str(sub),
                f"no {' or '.join('*_' + s + '.nii[.gz]' for s in suffixes)} in "
                f"{sub.name}/[ses-*/]anat; add the scan or remove the folder", sub.name))
            continue
        ses0, path0 = per_session[0]
        gallery.append(Scan(sub.name, path0, ses0, str(path0.relative_to(root))))
        if len(per_session) > 1:
            ses1, path1 = per_session[1]
            probes.append(Scan(sub.name, path1, ses1, str(path1.relative_to(root))))
    return gallery, probes, problems


# --------------------------------------------------------------------------- photographs
def _readable_image(path: Path) -> "str | None":
    """None if PIL can decode ``path``; else the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        from .recognition.align import load_image  # the study's own decoder: size guard, bit depths

        load_image(path, decode_side=512)  # reduced decode: the check, not the pixels
    except ImportError:  # pragma: no cover - torch missing: Pillow alone
        try:
            with Image.open(path) as im:
                im.load()  # verify() misses truncated JPEG data; load() does not
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure (bombs, truncation, bugs) is this file's problem
        if isinstance(exc, PermissionError):
            return f"permission denied ({exc.strerror or exc}); check the file's permissions"
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _match_participant(name: str, subjects: Mapping[str, str]) -> "str | None":
    """Map a photo folder / CSV name onto a gallery subject id (``01`` <-> ``sub-01``)."""
    if name in subjects:
        return subjects[name]
    return subjects.get(_bids_label(name))


def read_photos(source: "str | Path", subjects: Sequence[str], *, check_images: bool = True,
                ) -> tuple[dict[str, list[Path]], list[Problem]]:
    """Collect each participant's photographs.

    Parameters
    ----------
    source : str or Path
        A folder holding one folder per participant (``<participant>/*.jpg``,
        ``.png``, ...), or a CSV with a participant column (as for manifests)
        and a photo path column (``photo``, ``photograph``, ``path``, ``file``
        or ``image``; relative to the CSV's folder).
    subjects : sequence of str
        Gallery subject ids. A participant id matches a subject id equal to it
        or, for BIDS, with ``sub-`` added or removed.
    check_images : bool
        Decode every photograph now, so that an unreadable one is reported
        before hours of computing.

    Returns
    -------
    photos : dict
        gallery subject id -> sorted list of readable photograph paths; a
        participant appears only with at least one.
    problems : list of Problem
        ``unknown_participant`` (a folder or rows for nobody in the gallery),
        ``empty_photo_folder``, ``missing_photo``, ``unreadable_photo``.
    """
    source = Path(source).expanduser().resolve()
    index = {}
    for s in subjects:
        index[s] = s
        index.setdefault(_bids_label(s), s)
    listed: dict[str, list[tuple[str, Path]]] = {}
    problems: list[Problem] = []
    skipped: list[Problem] = []
    if source.is_dir():
        folders = sorted(c for c in source.iterdir() if c.is_dir() and not c.name.startswith("."))
        stray = sorted(c for c in source.iterdir() if c.is_file() and _has_suffix(c, PHOTO_SUFFIXES))
        if not folders and stray:
            raise ManifestError(
                f"{source}: photographs lie directly in the folder; put each participant's "
                "photographs in a folder named after the participant (PHOTOS/<participant>/*.jpg)")
        for folder in folders:
            entries = sorted(folder.iterdir())
            files = [f for f in entries if _is_file(f) and _has_suffix(f, PHOTO_SUFFIXES)]
            listed.setdefault(folder.name, [])
            listed[folder.name].extend((str(f), f) for f in files)
            for f in entries:  # every other visible entry is reported, never dropped silently
                if f in files or f.name.startswith("."):
                    continue
                what = ("a folder" if f.is_dir() else "not a photograph type" if _is_file(f)
                        else "not a readable file (a broken link?)")
                skipped.append(Problem(
                    "skipped_file", str(f),
                    f"{f.name} in the photographs of {folder.name!r} was skipped: {what}; photographs are "
                    f"{', '.join(PHOTO_SUFFIXES)} (convert it, or move it out of the folder)", folder.name))
    elif source.is_file():
        header, rows = _read_csv(source)
        pcol = _pick_column(header, _SUBJECT_COLUMNS)
        fcol = _pick_column(header, _PHOTO_COLUMNS)
        if pcol is None or fcol is None:
            raise ManifestError(
                f"{source}: header {','.join(header)!r} lacks a participant column or a photo path "
                f"column ({'/'.join(_PHOTO_COLUMNS)}); write a header such as 'participant,photo'")
        for line, row in rows:
            who = (row.get(pcol) or "").strip()
            value = (row.get(fcol) or "").strip()
            if not who and not value:
                continue
            where = f"{source.name} line {line}"
            if not who or not value:
                problems.append(Problem("empty_row", where, f"needs both a {pcol} and a {fcol}; "
                                        "fill in the cell or delete the row", who or None))
                continue
            listed.setdefault(who, [])
            path = _resolve(value, source.parent)
            if not _is_file(path):
                problems.append(Problem("missing_photo", where,
                                        f"photograph {path} of {who!r} does not exist; fix the path", who))
                continue
            listed[who].append((where, path))
    else:
        raise ManifestError(f"{source}: no such file or folder; give a folder of participant "
                            "folders or a CSV of participant,photo rows")

    photos: dict[str, list[Path]] = {}
    for name, entries in listed.items():
        subject = _match_participant(name, index)
        where0 = str(source / name) if source.is_dir() else f"{source.name} ({name})"
        if subject is None:
            problems.append(Problem(
                "unknown_participant", where0,
                f"photographs of participant {name!r}, who has no scan in the gallery; "
                "rename the folder to the subject id of their scan, or add their scan", name))
            continue
        if not entries:
            if source.is_dir():
                problems.append(Problem(
                    "empty_photo_folder", where0,
                    f"no photographs ({', '.join(PHOTO_SUFFIXES)}) for participant {name!r}; "
                    "add their photographs or remove the folder", subject))
            continue
        good = []
        for where, path in entries:
            reason = _readable_image(path) if check_images else None
            if reason is not None:
                problems.append(Problem(
                    "unreadable_photo", where if where != str(path) else str(path),
                    f"cannot read photograph {path.name} of {name!r} as an image ({reason}); "
                    "replace it with a JPEG or PNG, or remove it", subject))
                continue
            good.append(path)
        if good:
            photos.setdefault(subject, []).extend(good)
    known = {name for name in listed if _match_participant(name, index) is not None}
    problems.extend(p for p in skipped if p.subject in known)  # an unknown folder is one problem already
    return photos, problems


# --------------------------------------------------------------------------- all together
def load_inputs(source: "str | Path", *, photos: "str | Path | None" = None,
                probe_manifest: "str | Path | None" = None,
                bids_suffixes: Sequence[str] = ("T1w", "FLAIR"),
                check_images: bool = True) -> StudyInputs:
    """Read a study's scans (manifest or BIDS) and photographs, collecting problems.

    Parameters
    ----------
    source : str or Path
        A manifest CSV or a BIDS dataset folder.
    photos : str or Path, optional
        Photograph folder or CSV (see :func:`read_photos`).
    probe_manifest : str or Path, optional
        A second manifest whose scans are scan-to-scan probes; replaces any
        probe scans found in ``source``.
    bids_suffixes : sequence of str
        BIDS suffixes accepted, in order of preference.
    check_images : bool
        Decode every photograph while reading.

    Returns
    -------
    StudyInputs

    Raises
    ------
    ManifestError
        The source is unreadable or yields no usable scan.
    """
    src = Path(source).expanduser().resolve()
    if src.is_dir():
        if not is_bids(src):
            raise ManifestError(f"{src}: a folder without sub-* folders or dataset_description.json; "
                                "give a BIDS dataset or a manifest CSV (subject,scan)")
        gallery, probe_scans, problems = discover_bids(src, suffixes=bids_suffixes)
    else:
        gallery, probe_scans, problems = read_manifest(src)
    if not gallery:
        details = "; ".join(str(p) for p in problems[:3])
        raise ManifestError(f"{src}: no usable scan ({details}); fix the rows and run again")
    subjects = [s.subject for s in gallery]
    if probe_manifest is not None:
        probe_scans, more = read_probe_manifest(probe_manifest, subjects)
        problems.extend(more)
    photo_map: dict[str, list[Path]] = {}
    if photos is not None:
        photo_map, more = read_photos(photos, subjects, check_images=check_images)
        problems.extend(more)
    return StudyInputs(gallery, probe_scans, photo_map, problems, src)
