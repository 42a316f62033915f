"""Deface files: one scan, a manifest or a BIDS folder; write ``*_defaced.nii.gz`` with a JSON sidecar.

The defaced image keeps the input's voxel grid, orientation, data type and
intensity scaling: only the voxels the method changed are rewritten, in the
file's own stored values, so every other voxel (the brain included) is
bit-for-bit the input's. The sidecar ``*_defaced.json`` says how the file
was made (method, options, template files with their SHA-256, the
registration, the voxel counts, the input's SHA-256). The input is never
overwritten; an existing output is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import atomic_path, child_path, safe_component, sha256_file, write_text_atomic
from ..errors import MRIFaceError
from .core import DefaceError, DefaceResult, run_method

__all__ = ["defaced_name", "write_defaced", "deface_file", "deface_batch", "BatchResult"]

_SCAN_RE = re.compile(r"\.(nii|nii\.gz|mgz|mgh)$", re.IGNORECASE)


def defaced_name(path: "str | os.PathLike[str]") -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w_defaced.nii.gz`` (any scan suffix -> ``.nii.gz``)."""
    name = Path(path).name
    stem = _SCAN_RE.sub("", name)
    return f"{stem}_defaced.nii.gz"


def _source_name(src: Path, dest: Path) -> str:
    """The input as the sidecar names it: relative to the output's folder when it lies
    under it, else its file name only (sidecars travel with shared data: no absolute path)."""
    src, folder = src.resolve(), dest.resolve().parent
    return src.relative_to(folder).as_posix() if folder in src.parents else src.name


def _sidecar_path(dest: Path) -> Path:
    return dest.with_name(re.sub(r"\.nii(\.gz)?$", "", dest.name) + ".json")


def _check_dest(src: Path, dest: Path, overwrite: bool) -> None:
    if not dest.name.lower().endswith((".nii", ".nii.gz")):
        raise DefaceError(f"{dest}: the output must be a NIfTI file (.nii.gz or .nii) or a folder")
    if dest.resolve() == src.resolve():
        raise DefaceError(f"{dest}: is the input scan itself; mriface never overwrites the input, choose another output")
    if dest.exists() and not overwrite:
        raise DefaceError(f"{dest}: exists already; pass --overwrite (overwrite=True) to replace it")


def write_defaced(result: DefaceResult, src: "str | os.PathLike[str]", dest: "str | os.PathLike[str]") -> Path:
    """Write ``result`` over a copy of ``src``'s image to ``dest`` (NIfTI, atomically).

    Only the voxels that differ from the input are rewritten, converted to
    the file's stored type through its own scaling (``scl_slope``/``scl_inter``),
    rounded and clipped for integer types; the header is the input's.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    src, dest = Path(src), Path(dest)
    img = nib.load(str(src))
    if len(img.shape) != 3:
        raise DefaceError(f"{src}: a {len(img.shape)}-D image; write_defaced handles 3D scans only")
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(img.affine))
    new = apply_orientation(result.volume.data, back)
    orig_vals = np.asarray(img.dataobj, dtype=np.float32)
    changed = new != orig_vals
    is_nifti = isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))
    if is_nifti:
        raw = np.asarray(img.dataobj.get_unscaled()).copy()
        slope, inter = img.dataobj.slope, img.dataobj.inter
        vals = (new[changed].astype(np.float64) - inter) / slope
        if np.issubdtype(raw.dtype, np.integer):
            info = np.iinfo(raw.dtype)
            vals = np.clip(np.rint(vals), info.min, info.max)
        raw[changed] = vals.astype(raw.dtype)
        hdr = img.header.copy()
        out = type(img)(raw, img.affine, hdr)
        out.header.set_slope_inter(slope if slope != 1 or inter != 0 else None,
                                   inter if slope != 1 or inter != 0 else None)
        out.set_data_dtype(raw.dtype)
    else:  # MGH/MGZ and others: a NIfTI of the same data type
        dtype = img.get_data_dtype()
        data = orig_vals.copy()
        data[changed] = new[changed]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            data = np.clip(np.rint(data), info.min, info.max)
        out = nib.Nifti1Image(data.astype(dtype), img.affine)
    suffix = ".nii.gz" if dest.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(dest) as tmp:
        tmp_img = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the name
        nib.save(out, str(tmp_img))
        os.replace(tmp_img, tmp)
    return dest


def deface_file(src: "str | os.PathLike[str]", dest: "str | os.PathLike[str] | None" = None, *,
                method: str = "mask", overwrite: bool = False, **options) -> dict:
    """Deface one scan file; write the image and its sidecar; return the sidecar's content.

    Parameters
    ----------
    src : path-like
        A 3D NIfTI or MGH/MGZ head scan.
    dest : path-like, optional
        Output ``.nii.gz``; default ``defaced_name(src)`` beside ``src``.
    method : str
        A registered method.
    overwrite : bool
        Replace an existing output (never the input).
    **options
        Passed to :func:`mriface.deface.run_method`.

    Raises
    ------
    DefaceError
        The output exists (without ``overwrite``), is the input, or the scan
        cannot be defaced (CT, failed registration, already defaced).
    """
    from .. import __version__
    from ..volume import load_volume

    src = Path(src).expanduser()
    dest = Path(dest).expanduser() if dest is not None else src.with_name(defaced_name(src))
    if dest.is_dir():
        dest = dest / defaced_name(src)
    _check_dest(src, dest, overwrite)
    sidecar = _sidecar_path(dest)
    t0 = time.perf_counter()
    vol = load_volume(src)
    result = run_method(method, vol, **options)
    if result.changed_in_brain != 0:  # run_method guarantees it; a check that costs nothing
        raise DefaceError(f"{src}: {result.changed_in_brain} brain voxels changed; not writing")
    write_defaced(result, src, dest)
    info = {
        "Description": f"Defaced with mriface.deface method '{result.method}'",
        "Sources": [_source_name(src, dest)],
        "GeneratedBy": [{"Name": "mriface", "Version": __version__, "Method": result.method}],
        "InputSHA256": sha256_file(src),
        "OutputSHA256": sha256_file(dest),
        "TemplateFiles": _template_sources(result),
        **result.summary(),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    write_text_atomic(sidecar, json.dumps(info, indent=2) + "\n")
    return info


def _template_sources(result: DefaceResult) -> dict:
    """Sample key -> SHA-256 of the template files the result used."""
    from .templates import load_template

    name = result.options.get("template", "pydeface")
    try:
        return dict(load_template(name).sources)
    except MRIFaceError:
        return {}


@dataclass
class BatchResult:
    """What :func:`deface_batch` did: one sidecar per written scan, one problem per failed one."""

    written: list = field(default_factory=list)  # (input Path, output Path)
    problems: list = field(default_factory=list)  # mriface.inputs.Problem


def _batch_inputs(source: Path) -> "tuple[list[tuple[Path, Path]], list]":
    """(scan, path relative to the output folder) pairs of a manifest CSV or a BIDS folder, and the
    manifest's problems (missing files, duplicate subjects)."""
    from ..inputs import is_bids, read_manifest

    if source.is_dir():
        if not is_bids(source):
            raise DefaceError(f"{source}: a folder that is not a BIDS dataset (no sub-* folders); "
                              "give a scan, a manifest CSV or a BIDS folder")
        scans = sorted(p for p in source.glob("sub-*/**/anat/*") if p.is_file() and _SCAN_RE.search(p.name)
                       and "_defaced" not in p.name)
        return [(p, p.parent.relative_to(source) / defaced_name(p)) for p in scans], []
    gallery, probes, problems = read_manifest(source)
    pairs = []
    for s in list(gallery) + list(probes):  # subject ids from the manifest: one safe name each (_io.child_path)
        sub = safe_component(s.subject)
        rel = Path(sub) / defaced_name(s.path)
        if any(r == rel for _, r in pairs):
            rel = Path(sub) / safe_component(s.session or "probe") / defaced_name(s.path)
        pairs.append((s.path, rel))
    return pairs, list(problems)


def deface_batch(source: "str | os.PathLike[str]", out: "str | os.PathLike[str]", *, method: str = "mask",
                 overwrite: bool = False, progress: bool = False, **options) -> BatchResult:
    """Deface every scan of a manifest CSV or a BIDS folder into ``out``.

    BIDS scans (``sub-*/[ses-*/]anat/*.nii[.gz]``) keep their relative folder;
    manifest scans go to ``out/<subject>/``. A scan that fails becomes a
    :class:`~mriface.inputs.Problem` and the rest go on; ``out/deface.json``
    lists both.
    """
    from ..inputs import Problem

    source, out = Path(source).expanduser(), Path(out).expanduser()
    pairs, listed = _batch_inputs(source)
    res = BatchResult(problems=list(listed))
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc=f"deface {method}", unit="scan")
    for src, rel in it:
        try:
            dest = child_path(out, *Path(rel).parts)  # refuses anything that would leave out
            deface_file(src, dest, method=method, overwrite=overwrite, **options)
            res.written.append((src, dest))
        except MRIFaceError as exc:
            kind = type(exc).__name__
            res.problems.append(Problem(kind, str(src), str(exc)))
    summary = {"method": method, "source": str(source),
               "written": [{"input": str(a), "output": str(b)} for a, b in res.written],
               "problems": [{"kind": p.kind, "where": p.where, "message": p.message} for p in res.problems]}
    write_text_atomic(out / "deface.json", json.dumps(summary, indent=2) + "\n")
    return res
