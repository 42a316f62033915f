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
    from scipy.spatial import cKDTree

    sel = rng.choice(points.shape[0], min(points.shape[0], 15000), replace=False)
    tree_pts, tree_nrm = points[sel], normals[sel]
    tree = cKDTree(tree_pts)
    probe_all = points[rng.choice(points.shape[0], min(points.shape[0], 500), replace=False)]
    c = points.mean(axis=0)

    def score(n, off, probe=probe_all):
        n = n / np.linalg.norm(n)
        m = probe - 2.0 * ((probe - c) @ n - off)[:, None] * n
        # one thread: a query of 250-500 points takes ~0.2 ms, and workers=2 starts
        # threads per call that cost 0.8 ms of CPU (and more wall time) over ~280 calls
        _, idx = tree.query(m, workers=1)
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
    return _refine_planes(grid, cands, score, c)



def _refine_planes(grid, cands: np.ndarray, score, centre: np.ndarray):
    """Refine the best distinct candidate planes with Nelder-Mead; the best one found.

    Parameters
    ----------
    grid : list of (float, int, float)
        (coarse score, candidate index, offset in mm), sorted best first.
    cands : (K, 3) ndarray
        Candidate unit normals.
    score : callable
        ``score(normal, offset) -> float`` (mm; lower is better), on all probe points.
    centre : (3,) ndarray
        The point offsets are measured from (world mm).

    Returns
    -------
    (normal (3,), point on the plane (3,), score)
        Of the best of at most four candidates more than ~25 degrees apart.
    """
    from scipy.optimize import minimize

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
            best = (n, centre + res.x[2] * n, float(res.fun))
        if len(seen) >= 4:
            break
    return best


#: the mesh axis conventions ``estimate_face_frame(axes=...)`` knows: name ->
#: (world axis index of anterior, of superior). "ras" is the scanner's world
#: (x right, y anterior, z superior); "y-up" is what 3D-scanner,
#: photogrammetry and graphics software write (x across, y up, z towards the
#: viewer, i.e. out of the face).
AXES = {"ras": (1, 2), "y-up": (2, 1)}
#: an open mesh's area-weighted mean normal is taken as "roughly forward" when
#: its length is at least this fraction of the total area (a face shell:
#: ~0.5-0.8; a whole head with an open neck: ~0.1-0.2, pointing up)
_SHELL_MIN = 0.35
#: forward is searched within this angle of such a shell's mean normal
_SHELL_MAX_DEG = 40.0
#: up is taken from a mesh axis only when the up line lies within this angle of it
_AXIS_MAX_DEG = 35.0


def estimate_face_frame(verts: np.ndarray, faces: np.ndarray, *, seed: int = 0,
                        axes: str = "ras", closed: bool = True) -> FaceFrame:
    """Locate the face on a head surface from its shape alone.

    1. Mirror symmetry: the head's best mirror plane is the mid-sagittal plane
       (its normal is left-right).
    2. The nose: for each direction within that plane, compare how far the
       skin reaches along it on the midline (a 12 mm strip) with how far it
       reaches 18-35 mm to the side. Only at the nose does the midline stand
       out by 2-3 cm (the back and top of the head are round: < 1 cm; a cut
       neck is flat: 0). The direction of greatest protrusion is ``forward``;
       the midline point furthest along it is the nose tip. For an open mesh
       that faces one way (a face-only scan), only directions within 40
       degrees of its mean normal are searched: the edges of a cropped face
       stand out along the midline too.
    3. ``up`` lies in the mid-sagittal plane, orthogonal to ``forward``. Its
       sign: for a closed surface (a whole head) it points from the nose tip
       towards the surface's area centroid (the cranium outweighs the jaw and
       neck). An open mesh (a face scan, cropped anywhere) has no such
       balance, so the mesh's own axes decide: ``up`` takes the positive
       direction of the mesh's superior axis (``axes``); with
       ``axes="auto"``, of whichever of the mesh's y and z axes the up line
       lies within 35 degrees of (z: RAS, y: y-up). When neither fits, the
       centroid decides and a warning says the sign is a guess.
    4. ``center`` is 15 mm above the nose tip and 5 mm behind the level of the
       cheeks, on the midline.
    5. No nose (the midline stands out less than 4.5 mm: defaced, or the face
       cut off): a warning, and ``forward``/``up`` are the mesh's anterior
       and superior axes (``axes``; RAS for ``"auto"``) projected into the
       symmetry plane; an open shell's ``forward`` is the direction it faces
       (its mean normal) instead.

    Parameters
    ----------
    verts : numpy.ndarray
        (V, 3) vertex positions, mm (world RAS+ for a scan's surface).
    faces : numpy.ndarray
        (F, 3) indices; points are sampled over the triangles by area.
    seed : int
        Seed of the point subsampling (the result is deterministic).
    axes : {"ras", "y-up", "auto"}
        Which of the mesh's axes are anterior and superior: ``"ras"`` (y, z;
        a scan's world), ``"y-up"`` (z, y; 3D scanners, photogrammetry,
        graphics) or ``"auto"`` (detected from the found up line, see 3).
        Used only for an open mesh's ``up`` sign and for the no-nose
        fallback; the face itself is found from the shape.
    closed : bool
        Whether the surface is closed (a whole head). ``False`` for a face
        scan or any mesh with a boundary (see 2 and 3).

    Returns
    -------
    FaceFrame

    Raises
    ------
    SurfaceError
        Too few points, no protrusion that could be a nose, or unknown ``axes``.
    """
    if axes not in AXES and axes != "auto":
        raise SurfaceError(f"axes={axes!r} is not one of 'ras', 'y-up', 'auto'")
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
        # np.take, not v[f[cand]]: the same rows, half the time
        tri = np.take(v, f[cand], axis=0)
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
    shell = None
    if not closed:
        shell = _shell_direction(v, f)
        if shell is not None:
            # a face-only shell: its cut edges (forehead, chin) stand out on
            # the midline as much as a nose; search only the side it faces
            prot_s = np.where(dirs @ shell >= np.cos(np.deg2rad(_SHELL_MAX_DEG)), prot_s, -np.inf)
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
        return _frame_without_nose(pts, n, p0, protrusion, axes, shell)
    up = np.cross(forward, n)
    up /= np.linalg.norm(up)
    if closed:
        if (pts.mean(axis=0) - tip) @ up < 0:
            up = -up
    else:
        up = _open_mesh_up(up, pts, tip, axes)
    # put the tip on the symmetry plane before placing the centre
    tip_mid = tip - ((tip - p0) @ n) * n
    center = tip_mid + 15.0 * up - (protrusion + 5.0) * forward
    return FaceFrame(center=center.astype(np.float64), forward=forward, up=up)


def _shell_direction(v: np.ndarray, f: np.ndarray) -> "np.ndarray | None":
    """Unit area-weighted mean normal of an open mesh that faces one way, else None.

    A closed surface's normals sum to zero; a whole head open only at the neck
    sums to the neck's opening (pointing up, short); a face shell's sum is
    long and points out of the face.
    """
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    total = fn.sum(axis=0)
    length = float(np.linalg.norm(total))
    if length < _SHELL_MIN * float(np.linalg.norm(fn, axis=1).sum()):
        return None
    return total / length


def _open_mesh_up(up: np.ndarray, pts: np.ndarray, tip: np.ndarray, axes: str) -> np.ndarray:
    """The sign of an open mesh's ``up``: the positive direction of the mesh's superior axis."""
    import warnings

    if axes == "auto":
        k = 1 + int(np.argmax(np.abs(up[1:])))  # y or z: whichever the up line is nearer
    else:
        k = AXES[axes][1]
    if abs(up[k]) >= np.cos(np.deg2rad(_AXIS_MAX_DEG)):
        return up if up[k] > 0 else -up
    guess = up if (pts.mean(axis=0) - tip) @ up >= 0 else -up
    warnings.warn(
        f"open mesh: its up direction ({np.round(guess, 2).tolist()}) lies more than {_AXIS_MAX_DEG:g} degrees "
        f"from the mesh's {'y and z axes' if axes == 'auto' else 'superior axis'}, so whether the face is "
        "upside down is a guess (towards the mesh's centroid); reorient the mesh or pass axes='ras' or 'y-up'",
        stacklevel=3,
    )
    return guess


#: the nose tip stands 7-25 mm further out than anything 18-35 mm to the side
#: (brows, cheeks) on the sample heads (6 mm on the blurred 2 mm average, tilted),
#: 3 mm on the defaced pydeface head:
#: less than this means no intact face
_MIN_NOSE_MM = 4.5


def _frame_without_nose(pts: np.ndarray, n: np.ndarray, p0: np.ndarray, protrusion: float,
                        axes: str = "ras", shell: "np.ndarray | None" = None) -> FaceFrame:
    """Frame of a head whose face is gone (defaced, or cut off by the field of view).

    Nothing on the surface says where the face was, so the mesh's axes
    decide within the mid-sagittal plane: ``forward`` is its anterior axis
    and ``up`` its superior axis (``axes``: world +y and +z for ``"ras"`` and
    ``"auto"``, +z and +y for ``"y-up"``), both projected into the plane.
    An open shell (``shell``: its unit mean normal, see :func:`_shell_direction`)
    was scanned from where the face looks: ``forward`` is that direction
    instead, and ``up`` follows the mesh's nearer of y and z for ``"auto"``.
    The centre is where the skin along ``forward`` would be, at mid-height
    of the midline, 15 mm inside. A warning says so.
    """
    import warnings

    ai, si = AXES["ras" if axes == "auto" else axes]
    names = "scanner's anterior and superior axes" if ai == 1 else "mesh's +z (forward) and +y (up) axes"
    fwd = None
    if shell is not None and np.linalg.norm(shell - (shell @ n) * n) > 0.3:
        fwd = shell - (shell @ n) * n
        names = "direction the open mesh faces (its mean normal)"
    elif axes == "auto":
        names += " (taken as RAS; pass axes='y-up' for a mesh whose y axis is up)"
    warnings.warn(
        f"no nose found on the surface (midline protrudes {protrusion:.1f} mm, a face gives "
        f"> {_MIN_NOSE_MM:g} mm): defaced or face cut off? The face frame falls back to the "
        f"{names} within the symmetry plane",
        stacklevel=3,
    )
    if fwd is None:
        fwd = np.eye(3)[ai] - n[ai] * n
        if np.linalg.norm(fwd) < 0.3:  # the symmetry plane faces anterior: keep its own axes
            fwd = np.cross(n, np.eye(3)[si])
    fwd /= np.linalg.norm(fwd)
    up = np.cross(fwd, n)
    up /= np.linalg.norm(up)
    if shell is not None and axes == "auto":
        si = 1 + int(np.argmax(np.abs(up[1:])))
    if up[si] < 0:
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
