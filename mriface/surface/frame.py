"""The face frame: where the face is on a head surface and which way it looks, from its shape alone."""

from __future__ import annotations

import numpy as np

from ..errors import SurfaceError
from .types import FaceFrame

__all__ = ["estimate_face_frame"]


def _fibonacci_hemisphere(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread evenly over the half-sphere z >= 0."""
    i = np.arange(n) + 0.5
    z = i / n
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _symmetry_plane(points: np.ndarray, normals: np.ndarray, rng: np.random.Generator):
    """Best mirror plane of a head: (unit normal, point on the plane, score mm).

    A plane is scored by mirroring a sample of surface points through it and
    measuring how far each lands from the surface (point-to-tangent-plane
    distance to the nearest surface point, capped at 10 mm so that parts the
    scan cut off on one side only do not dominate). Every direction of a
    half-sphere (and each principal axis of the cloud) is tried as the normal
    of a plane near the centroid; the four best distinct ones are refined
    (normal and offset) with Nelder-Mead.
    """
    from scipy.optimize import minimize
    from scipy.spatial import cKDTree

    sel = rng.choice(points.shape[0], min(points.shape[0], 15000), replace=False)
    tree_pts, tree_nrm = points[sel], normals[sel]
    tree = cKDTree(tree_pts)
    probe_all = points[rng.choice(points.shape[0], min(points.shape[0], 500), replace=False)]
    c = points.mean(axis=0)

    def score(n, off, probe=probe_all):
        n = n / np.linalg.norm(n)
        m = probe - 2.0 * ((probe - c) @ n - off)[:, None] * n
        _, idx = tree.query(m)
        d = np.abs(np.einsum("ij,ij->i", m - tree_pts[idx], tree_nrm[idx]))
        return float(np.minimum(d, 10.0).mean())

    # an even spread of normals, plus the cloud's principal axes (a head's
    # left-right axis is nearly always one of them)
    _, _, axes = np.linalg.svd(tree_pts[:3000] - c, full_matrices=False)
    cands = np.concatenate([axes, _fibonacci_hemisphere(100)])
    coarse_probe = probe_all[:250]
    # a first guess of each plane's offset: midway between the extremes
    proj = (tree_pts[:3000] - c) @ cands.T
    offs = 0.5 * (np.percentile(proj, 1, axis=0) + np.percentile(proj, 99, axis=0))
    grid = [(score(n, off, coarse_probe), i, off) for i, (n, off) in enumerate(zip(cands, offs))]
    grid.sort()
    best = None
    seen: list = []
    for sc, i, off in grid:
        if any(abs(cands[i] @ cands[k]) > 0.9 for k in seen):
            continue
        seen.append(i)
        n0 = cands[i]
        # parametrise by two tilts in the plane's own tangent basis, plus offset
        t1 = np.cross(n0, [1.0, 0.0, 0.0] if abs(n0[0]) < 0.9 else [0.0, 1.0, 0.0])
        t1 /= np.linalg.norm(t1)
        t2 = np.cross(n0, t1)

        def f(x, n0=n0, t1=t1, t2=t2):
            return score(n0 + x[0] * t1 + x[1] * t2, x[2])

        res = minimize(f, np.array([0.0, 0.0, off]), method="Nelder-Mead",
                       options={"xatol": 1e-3, "fatol": 1e-3, "maxfev": 45,
                                "initial_simplex": np.array([[0, 0, off], [0.08, 0, off], [0, 0.08, off], [0, 0, off + 4.0]])})
        n = n0 + res.x[0] * t1 + res.x[1] * t2
        n /= np.linalg.norm(n)
        if best is None or res.fun < best[2]:
            best = (n, c + res.x[2] * n, float(res.fun))
        if len(seen) >= 4:
            break
    return best


def estimate_face_frame(verts: np.ndarray, faces: np.ndarray, *, seed: int = 0) -> FaceFrame:
    """Locate the face on a head surface from its shape alone.

    1. Mirror symmetry: the head's best mirror plane is the mid-sagittal plane
       (its normal is left-right).
    2. The nose: for each direction within that plane, compare how far the
       skin reaches along it on the midline (a 12 mm strip) with how far it
       reaches 18-35 mm to the side. Only at the nose does the midline stand
       out by 2-3 cm (the back and top of the head are round: < 1 cm; a cut
       neck is flat: 0). The direction of greatest protrusion is ``forward``;
       the midline point furthest along it is the nose tip.
    3. ``up`` lies in the mid-sagittal plane, orthogonal to ``forward``, and
       points from the nose tip towards the surface's area centroid (the
       cranium outweighs the jaw and neck).
    4. ``center`` is 15 mm above the nose tip and 5 mm behind the level of the
       cheeks, on the midline.
    5. No nose (the midline stands out less than 4.5 mm: defaced, or the face
       cut off): a warning, and ``forward``/``up`` are the scanner's anterior
       and superior axes projected into the symmetry plane.

    Parameters
    ----------
    verts : numpy.ndarray
        (V, 3) vertex positions, mm, world RAS+.
    faces : numpy.ndarray
        (F, 3) indices; points are sampled over the triangles by area.
    seed : int
        Seed of the point subsampling (the result is deterministic).

    Returns
    -------
    FaceFrame

    Raises
    ------
    SurfaceError
        Too few points, or no protrusion that could be a nose.
    """
    rng = np.random.default_rng(seed)
    v = np.asarray(verts, dtype=np.float64)
    if v.shape[0] < 100:
        raise SurfaceError(f"surface has only {v.shape[0]} vertices: too few to find a face")
    if faces is None or not len(faces):
        raise SurfaceError("a surface without faces has no face to find")
    else:
        f = np.asarray(faces)
        # points spread by area: draw many faces uniformly, keep each with
        # probability proportional to its area
        cand = rng.integers(0, f.shape[0], size=min(4 * f.shape[0], 100_000))
        tri = v[f[cand]]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        area = np.linalg.norm(fn, axis=1)
        keep = rng.random(cand.size) * area.max() < area
        tri, fn, area = tri[keep][:40000], fn[keep][:40000], area[keep][:40000]
        bary = rng.dirichlet([1.0, 1.0, 1.0], size=tri.shape[0])
        pts = np.einsum("ij,ijk->ik", bary, tri)
        nrm = fn / np.maximum(area[:, None], 1e-30)
    n, p0, _ = _symmetry_plane(pts, nrm, rng)
    # orthonormal basis (a, b) of the mid-sagittal plane
    a = np.cross(n, [1.0, 0.0, 0.0] if abs(n[0]) < 0.9 else [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    side = (pts - p0) @ n
    mid = pts[np.abs(side) < 6.0]
    lat = pts[(np.abs(side) > 18.0) & (np.abs(side) < 35.0)]
    if mid.shape[0] < 50 or lat.shape[0] < 50:
        raise SurfaceError("surface is too narrow around its symmetry plane to hold a face")
    theta = np.deg2rad(np.arange(0, 360, 1.0))
    dirs = np.cos(theta)[:, None] * a + np.sin(theta)[:, None] * b  # (360, 3)
    m_reach = (mid @ dirs.T).max(axis=0)
    l_reach = (lat @ dirs.T).max(axis=0)
    prot = m_reach - l_reach
    # a little circular smoothing: the protrusion of one direction is noisy
    kern = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
    kern /= kern.sum()
    prot_s = np.convolve(np.concatenate([prot[-6:], prot, prot[:6]]), kern, mode="valid")
    j = int(np.argmax(prot_s))
    # centre of the peak: directions whose protrusion is within 20% of the top
    near = np.flatnonzero(prot_s >= prot_s[j] - 0.2 * max(prot_s[j], 1e-9))
    ang = theta[near]
    rel = np.angle(np.exp(1j * (ang - theta[j])))
    keep = np.abs(rel) < np.deg2rad(45)
    wts = prot_s[near][keep]
    th = theta[j] + float(np.sum(rel[keep] * wts) / np.sum(wts))
    forward = np.cos(th) * a + np.sin(th) * b
    forward /= np.linalg.norm(forward)
    tip = mid[int(np.argmax(mid @ forward))]
    protrusion = float(tip @ forward - (lat @ forward).max())
    if protrusion < _MIN_NOSE_MM:
        return _frame_without_nose(pts, n, p0, protrusion)
    up = np.cross(forward, n)
    up /= np.linalg.norm(up)
    if (pts.mean(axis=0) - tip) @ up < 0:
        up = -up
    # put the tip on the symmetry plane before placing the centre
    tip_mid = tip - ((tip - p0) @ n) * n
    center = tip_mid + 15.0 * up - (protrusion + 5.0) * forward
    return FaceFrame(center=center.astype(np.float64), forward=forward, up=up)


#: the nose tip stands 7-25 mm further out than anything 18-35 mm to the side
#: (brows, cheeks) on the sample heads (6 mm on the blurred 2 mm average, tilted),
#: 3 mm on the defaced pydeface head:
#: less than this means no intact face
_MIN_NOSE_MM = 4.5


def _frame_without_nose(pts: np.ndarray, n: np.ndarray, p0: np.ndarray, protrusion: float) -> FaceFrame:
    """Frame of a head whose face is gone (defaced, or cut off by the field of view).

    Nothing on the surface says where the face was, so the scanner's axes
    decide within the mid-sagittal plane: ``forward`` is world anterior (+y)
    and ``up`` world superior (+z), both projected into the plane; the
    centre is where the skin along ``forward`` would be, 30 mm below the
    top of the surface's midline reach, 15 mm inside. A warning says so.
    """
    import warnings

    warnings.warn(
        f"no nose found on the surface (midline protrudes {protrusion:.1f} mm, a face gives "
        f"> {_MIN_NOSE_MM:g} mm): defaced or face cut off? The face frame falls back to the "
        "scanner's anterior and superior axes within the symmetry plane",
        stacklevel=3,
    )
    fwd = np.array([0.0, 1.0, 0.0]) - n[1] * n
    if np.linalg.norm(fwd) < 0.3:  # the symmetry plane faces anterior: keep its own axes
        fwd = np.cross(n, [0.0, 0.0, 1.0])
    fwd /= np.linalg.norm(fwd)
    up = np.cross(fwd, n)
    up /= np.linalg.norm(up)
    if up[2] < 0:
        up = -up
    mid = pts[np.abs((pts - p0) @ n) < 6.0]
    h = mid @ up
    # the mid-face level: half-way between the top of the head and the lowest midline point
    level = 0.5 * (h.max() + h.min())
    band = mid[np.abs(h - level) < 10.0]
    front = band[int(np.argmax(band @ fwd))] if band.shape[0] else mid[int(np.argmax(mid @ fwd))]
    front = front - ((front - p0) @ n) * n
    center = front - 15.0 * fwd
    return FaceFrame(center=center.astype(np.float64), forward=fwd, up=up)
