"""Mesh files: read OBJ, PLY, GIfTI and FreeSurfer surfaces (:func:`load_surface`), write PLY/OBJ."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputFileError, SurfaceError
from .frame import estimate_face_frame
from .mesh import _compact, _signed_volume, _wind_open_outward, mesh_topology, vertex_normals_np
from .types import HeadSurface

__all__ = ["load_surface", "save_surface", "is_mesh_file", "MESH_SUFFIXES"]


#: PLY scalar type name -> numpy type
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _triangulate(polys: "list[list[int]]") -> np.ndarray:
    """Fan-triangulate polygons given as vertex index lists -> (F, 3) int64."""
    tris = [(p[0], p[i], p[i + 1]) for p in polys for i in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def _read_obj(path: Path):
    """Vertices and triangles of a Wavefront OBJ (``v`` and ``f`` records; polygons fanned)."""
    verts, polys = [], []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "f":
                idx = []
                for tok in parts[1:]:
                    i = int(tok.split("/")[0])
                    # OBJ counts from 1; negative indices count back from the last vertex so far
                    idx.append(i - 1 if i > 0 else len(verts) + i)
                polys.append(idx)
    return np.asarray(verts, dtype=np.float64).reshape(-1, 3), _triangulate(polys)


def _read_ply(path: Path):
    """Vertices and triangles of a PLY file (ascii, binary little- or big-endian)."""
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise ValueError("missing 'ply' magic line")
        fmt, elements = None, []
        while True:
            line = fh.readline()
            if not line:
                raise ValueError("header has no end_header")
            parts = line.decode("ascii", errors="replace").split()
            if not parts or parts[0] in ("comment", "obj_info"):
                continue
            if parts[0] == "format":
                fmt = parts[1]
            elif parts[0] == "element":
                elements.append((parts[1], int(parts[2]), []))
            elif parts[0] == "property":
                if parts[1] == "list":
                    elements[-1][2].append((parts[4], ("list", parts[2], parts[3])))
                else:
                    elements[-1][2].append((parts[2], parts[1]))
            elif parts[0] == "end_header":
                break
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise ValueError(f"unknown PLY format {fmt!r}")
        body = fh.read()
    verts = faces = None
    if fmt == "ascii":
        tokens = body.split()
        pos = 0
        for name, count, props in elements:
            rows = []
            for _ in range(count):
                row = []
                for pname, ptype in props:
                    if isinstance(ptype, tuple):
                        n = int(tokens[pos])
                        row.append([int(float(t)) for t in tokens[pos + 1: pos + 1 + n]])
                        pos += 1 + n
                    else:
                        row.append(float(tokens[pos]))
                        pos += 1
                rows.append(row)
            verts, faces = _ply_collect(name, props, rows, verts, faces)
        return verts, faces
    end = "<" if fmt == "binary_little_endian" else ">"
    pos = 0
    for name, count, props in elements:
        if all(not isinstance(t, tuple) for _, t in props):
            dt = np.dtype([(pn, end + _PLY_TYPES[pt]) for pn, pt in props])
            arr = np.frombuffer(body, dtype=dt, count=count, offset=pos)
            pos += dt.itemsize * count
            if name == "vertex":
                verts = np.stack([arr["x"], arr["y"], arr["z"]], axis=1).astype(np.float64)
            continue
        if name == "face" and len(props) == 1 and count > 0:
            # fast path for the usual all-triangles face list
            ct = np.dtype(end + _PLY_TYPES[props[0][1][1]])
            it = np.dtype(end + _PLY_TYPES[props[0][1][2]])
            dt = np.dtype([("n", ct), ("i", it, (3,))])
            if len(body) >= pos + dt.itemsize * count:
                arr = np.frombuffer(body, dtype=dt, count=count, offset=pos)
                if np.all(arr["n"] == 3):
                    faces = arr["i"].astype(np.int64)
                    pos += dt.itemsize * count
                    continue
        rows = []
        for _ in range(count):
            row = []
            for pname, ptype in props:
                if isinstance(ptype, tuple):
                    ct = np.dtype(end + _PLY_TYPES[ptype[1]])
                    it = np.dtype(end + _PLY_TYPES[ptype[2]])
                    n = int(np.frombuffer(body, ct, 1, pos)[0])
                    pos += ct.itemsize
                    row.append(np.frombuffer(body, it, n, pos).astype(np.int64).tolist())
                    pos += it.itemsize * n
                else:
                    t = np.dtype(end + _PLY_TYPES[ptype])
                    row.append(float(np.frombuffer(body, t, 1, pos)[0]))
                    pos += t.itemsize
            rows.append(row)
        verts, faces = _ply_collect(name, props, rows, verts, faces)
    return verts, faces


def _ply_collect(name, props, rows, verts, faces):
    names = [p[0] for p in props]
    if name == "vertex":
        ix = [names.index(c) for c in ("x", "y", "z")]
        verts = np.asarray([[r[i] for i in ix] for r in rows], dtype=np.float64).reshape(-1, 3)
    elif name == "face":
        li = next(i for i, (_, t) in enumerate(props) if isinstance(t, tuple))
        faces = _triangulate([r[li] for r in rows])
    return verts, faces


def _read_gifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    pts = tri = None
    for da in img.darrays:
        intent = nib.nifti1.intent_codes.label[da.intent]
        if intent == "pointset" and pts is None:
            pts = np.asarray(da.data, dtype=np.float64)
        elif intent == "triangle" and tri is None:
            tri = np.asarray(da.data, dtype=np.int64)
    if pts is None or tri is None:
        raise ValueError("GIfTI file has no POINTSET and TRIANGLE data arrays")
    return pts, tri


def _read_freesurfer(path: Path):
    import nibabel as nib

    coords, faces = nib.freesurfer.read_geometry(str(path))
    return np.asarray(coords, np.float64), np.asarray(faces, np.int64)


#: File-name endings of the mesh formats :func:`load_surface` reads by name
#: (lower case; ``.surf.gii`` ends in ``.gii``). FreeSurfer surfaces have no
#: extension of their own and are told by name (:data:`FREESURFER_SURFACES`)
#: or by their magic number.
MESH_SUFFIXES = (".obj", ".ply", ".gii")
#: Names of FreeSurfer triangle surfaces after the hemisphere prefix (``lh.``/``rh.``)
FREESURFER_SURFACES = (
    "seghead", "pial", "white", "smoothwm", "inflated", "sphere", "orig", "outer-skin", "head",
    "pial-outer-smoothed", "midthickness", "graymid",
)
#: File-name endings of volumes (:func:`mriface.load_volume`): never a mesh
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
#: the first three bytes of a FreeSurfer triangle surface
_FREESURFER_MAGIC = b"\xff\xff\xfe"


def is_mesh_file(path) -> bool:
    """Whether ``path`` names a mesh (for :func:`load_surface`) rather than a volume.

    Decided by the name: an ending in :data:`MESH_SUFFIXES`, or a FreeSurfer
    surface name such as ``lh.seghead`` (``lh.``/``rh.`` followed by one of
    :data:`FREESURFER_SURFACES`). A name that is neither a mesh's nor a
    volume's (``.nii``, ``.nii.gz``, ``.mgh``, ``.mgz``) is a mesh when the
    file exists and starts with FreeSurfer's surface magic number.

    Parameters
    ----------
    path : str or path-like
        The file; it need not exist unless its name is ambiguous.

    Returns
    -------
    bool

    Examples
    --------
    >>> is_mesh_file("sub-01_face.PLY"), is_mesh_file("surf/lh.seghead"), is_mesh_file("sub-01_T1w.nii.gz")
    (True, True, False)
    """
    name = Path(os.fspath(path)).name.lower()
    if name.endswith(MESH_SUFFIXES):
        return True
    if name.endswith(_VOLUME_SUFFIXES):
        return False
    hemi, _, rest = name.partition(".")
    if hemi in ("lh", "rh") and rest in FREESURFER_SURFACES:
        return True
    return _has_freesurfer_magic(Path(os.fspath(path)))


def _has_freesurfer_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(3) == _FREESURFER_MAGIC
    except OSError:
        return False


def _mesh_format(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".obj", "obj"), (".ply", "ply"), (".gii", "gifti")):
        if name.endswith(ext):
            return fmt
    with open(path, "rb") as fh:
        magic = fh.read(3)
    # FreeSurfer triangle surfaces (lh.seghead, lh.pial, ...) start with 0xFFFFFE
    if magic == _FREESURFER_MAGIC:
        return "freesurfer"
    return "unknown"


def load_surface(path, *, seed: int = 0, axes: str = "auto") -> HeadSurface:
    """Read a head or face surface made elsewhere and locate its face.

    Parameters
    ----------
    path : str or path-like
        A Wavefront ``.obj``, a ``.ply`` (ascii or binary), a GIfTI surface
        (``.gii``) or a FreeSurfer triangle surface (e.g. ``lh.seghead``, no
        extension). Coordinates are millimetres; vertices are kept as they
        are in the file (no axis is swapped). Polygons are split into
        triangles. The mesh may be a closed head or an open face scan in
        several pieces.
    seed : int
        Seed of the face-frame point sampling.
    axes : {"auto", "ras", "y-up"}
        The mesh's axis convention: ``"ras"`` (x right, y anterior, z
        superior: FreeSurfer, a scan's world), ``"y-up"`` (y up, z out of the
        face: 3D scanners, photogrammetry, graphics) or ``"auto"`` (detected).
        Only an open mesh's up/down and a face-less mesh's fallback frame
        depend on it (:func:`estimate_face_frame`); ``docs/surface.md``.

    Returns
    -------
    HeadSurface
        Unused vertices dropped, winding made counter-clockwise from outside
        (for a closed surface by its enclosed volume, else each connected
        piece by pointing its normals away from the mesh's centroid), vertex
        normals, face frame from :func:`estimate_face_frame`.

    Raises
    ------
    InputFileError
        Missing, a volume rather than a mesh, unknown format, or unreadable;
        the message names the file.
    SurfaceError
        No triangles, or no face could be located; the message names the file.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise InputFileError(f"{p}: is a folder, not a mesh file; give a .obj, .ply, .gii or FreeSurfer surface")
    if not p.is_file():
        raise InputFileError(f"{p}: no such file; check the path")
    if p.name.lower().endswith(_VOLUME_SUFFIXES):
        raise InputFileError(
            f"{p}: is a volume (NIfTI/MGH), not a mesh; read it with mriface.load_volume and "
            "mriface.extract_head_surface"
        )
    try:
        fmt = _mesh_format(p)
    except OSError as exc:
        raise InputFileError(f"{p}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    readers = {"obj": _read_obj, "ply": _read_ply, "gifti": _read_gifti, "freesurfer": _read_freesurfer}
    if fmt not in readers:
        raise InputFileError(
            f"{p}: unknown mesh format; give .obj, .ply, .gii or a FreeSurfer surface (e.g. lh.seghead)"
        )
    try:
        verts, faces = readers[fmt](p)
    except Exception as exc:  # malformed files raise anything from ValueError to IndexError
        raise InputFileError(
            f"{p}: could not read it as {fmt} ({type(exc).__name__}: {exc}); is the file complete?"
        ) from exc
    if verts is None or faces is None or len(faces) == 0 or len(verts) < 4:
        raise SurfaceError(f"{p}: the mesh has no triangles; give a triangle or polygon mesh, not a point cloud")
    if faces.min() < 0 or faces.max() >= len(verts) or not np.all(np.isfinite(verts)):
        raise InputFileError(f"{p}: face indices point outside the vertex list, or coordinates are not finite")
    verts, faces = _compact(verts, faces)
    topo = mesh_topology(faces, len(verts))
    closed = topo["boundary_edges"] == 0 and topo["nonmanifold_edges"] == 0
    if closed:
        if _signed_volume(verts, faces) < 0:
            faces = faces[:, ::-1].copy()
    else:
        # open surface (e.g. a 3D face scan, maybe in pieces): each piece's
        # normals should point away from the mesh's centroid
        faces = _wind_open_outward(verts, faces)
    verts32 = verts.astype(np.float32)
    try:
        frame = estimate_face_frame(verts32, faces, seed=seed, axes=axes, closed=closed)
    except SurfaceError as exc:
        raise SurfaceError(f"{p}: {exc}") from exc
    return HeadSurface(verts32, np.ascontiguousarray(faces, np.int64), vertex_normals_np(verts32, faces), frame)


def save_surface(surface: HeadSurface, path) -> Path:
    """Write a surface as binary little-endian ``.ply`` (with normals) or ``.obj``, atomically.

    The face frame is not stored (``load_surface`` re-estimates it); use
    :func:`save_surface_npz` to cache a surface with its frame.

    Returns
    -------
    pathlib.Path
    """
    from .._io import atomic_path

    p = Path(os.fspath(path)).expanduser()
    fmt = p.suffix.lower()
    if fmt not in (".ply", ".obj"):
        raise InputFileError(f"{p}: save_surface writes .ply or .obj; change the file name")
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as fh:
            if fmt == ".ply":
                head = (
                    "ply\nformat binary_little_endian 1.0\ncomment mriface head surface, mm, world RAS+\n"
                    f"element vertex {surface.n_verts}\nproperty float x\nproperty float y\nproperty float z\n"
                    "property float nx\nproperty float ny\nproperty float nz\n"
                    f"element face {surface.n_faces}\nproperty list uchar int vertex_indices\nend_header\n"
                )
                fh.write(head.encode("ascii"))
                vt = np.concatenate([surface.verts, surface.normals], axis=1).astype("<f4")
                fh.write(vt.tobytes())
                ft = np.zeros(surface.n_faces, dtype=[("n", "u1"), ("i", "<i4", (3,))])
                ft["n"] = 3
                ft["i"] = surface.faces
                fh.write(ft.tobytes())
            else:
                fh.write(b"# mriface head surface, mm, world RAS+\n")
                np.savetxt(fh, surface.verts, fmt="v %.6f %.6f %.6f")
                np.savetxt(fh, surface.faces + 1, fmt="f %d %d %d")
    return p
