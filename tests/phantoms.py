"""Analytic head phantoms and volume resampling helpers for the surface tests.

The phantom is the zero set of a smooth implicit function ``F`` (negative
inside, roughly a signed distance in mm near the surface): an ellipsoidal
skull, a nose-like ridge and a chin, blended with a smooth minimum. It is
voxelised with partial-volume edges (each voxel averages sub-voxel samples
of a one-sub-voxel-wide ramp across the surface, i.e. the box filter of the
solid) plus Gaussian noise. Distances from mesh vertices to the true surface
are measured by Newton projection onto ``F = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mriface.volume import Volume

#: world RAS+ centres (mm) and semi-axes (mm) of the phantom's parts
_SKULL = (np.array([0.0, 0.0, 0.0]), np.array([72.0, 92.0, 100.0]))
_NOSE = (np.array([0.0, 84.0, -18.0]), np.array([11.0, 20.0, 26.0]))
_CHIN = (np.array([0.0, 62.0, -78.0]), np.array([30.0, 26.0, 20.0]))
_SINUS = (np.array([0.0, 45.0, -10.0]), np.array([14.0, 12.0, 12.0]))
_BLEND_MM = 4.0


def _ellipsoid(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Near-signed distance (mm) to an axis-aligned ellipsoid; p (..., 3)."""
    q = (p - c) / r
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / r, axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (log-sum-exp), so the blended surface has no creases."""
    m = np.minimum(a, b)
    return m - k * np.log(np.exp(-(a - m) / k) + np.exp(-(b - m) / k))


@dataclass(frozen=True)
class HeadPhantom:
    """The analytic head: implicit function, true distances and true frame (world RAS+ mm)."""

    rotation: np.ndarray  # (3, 3) world rotation applied to the canonical phantom

    @property
    def forward(self) -> np.ndarray:
        return self.rotation @ np.array([0.0, 1.0, 0.0])

    @property
    def up(self) -> np.ndarray:
        return self.rotation @ np.array([0.0, 0.0, 1.0])

    def implicit(self, p: np.ndarray) -> np.ndarray:
        """F at world points p (..., 3): < 0 inside the head, ~ signed mm near the skin."""
        q = np.asarray(p, dtype=np.float64) @ self.rotation  # world -> canonical
        f = _smin(_ellipsoid(q, *_SKULL), _ellipsoid(q, *_NOSE), _BLEND_MM)
        return _smin(f, _ellipsoid(q, *_CHIN), _BLEND_MM)

    def gradient(self, p: np.ndarray, h: float = 1e-3) -> np.ndarray:
        g = np.empty(np.shape(p), dtype=np.float64)
        for i in range(3):
            e = np.zeros(3)
            e[i] = h
            g[..., i] = (self.implicit(p + e) - self.implicit(p - e)) / (2 * h)
        return g

    def distance(self, p: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Unsigned distance (mm) from points (N, 3) to the surface F = 0 (Newton projection)."""
        p = np.asarray(p, dtype=np.float64)
        q = p.copy()
        for _ in range(iterations):
            g = self.gradient(q)
            q = q - (self.implicit(q) / np.maximum((g * g).sum(-1), 1e-12))[:, None] * g
        return np.linalg.norm(q - p, axis=1)

    def inside_sinus(self, p: np.ndarray) -> np.ndarray:
        q = np.asarray(p, dtype=np.float64) @ self.rotation
        return _ellipsoid(q, *_SINUS) < 0


def voxel_of(volume: Volume, point) -> tuple:
    """(i, j, k) index of the voxel nearest a world point (RAS+ mm)."""
    return tuple(np.round(np.linalg.inv(volume.affine) @ np.append(point, 1.0))[:3].astype(int))


def rotation_about(axis: int, degrees: float) -> np.ndarray:
    """(3, 3) right-handed rotation by ``degrees`` about world axis 0 (x), 1 (y) or 2 (z)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def head_phantom(
    voxel_mm=(1.0, 1.0, 1.0),
    *,
    noise: float = 0.08,
    seed: int = 0,
    sinus: bool = True,
    head_rest: bool = False,
    rotation: "np.ndarray | None" = None,
    sub: int = 2,
) -> "tuple[Volume, HeadPhantom]":
    """Voxelise the analytic head.

    Parameters
    ----------
    voxel_mm : sequence of 3 floats
        Voxel size along x, y, z (mm), e.g. (1, 1, 3) for thick axial slices.
    noise : float
        Gaussian noise sigma; tissue is 1.0 and air 0.05.
    seed : int
        Noise seed.
    sinus : bool
        Put an air-filled cavity (a "sinus") inside, behind the nose.
    head_rest : bool
        Add a separate slab of tissue-bright material 8 mm behind the head.
    rotation : (3, 3) array, optional
        Rotate the head in world space (the grid stays axis-aligned).
    sub : int
        Sub-samples per mm-ish along each axis for the partial-volume average.

    Returns
    -------
    (Volume, HeadPhantom)
    """
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    ph = HeadPhantom(rotation=rot)
    vox = np.asarray(voxel_mm, float)
    half = np.array([88.0, 116.0, 116.0])
    shape = np.ceil(2 * half / vox).astype(int)
    origin = -half + 0.5 * vox
    axes = [origin[i] + vox[i] * np.arange(shape[i]) for i in range(3)]

    def centres_of(idx):
        return np.stack([axes[a][idx[:, a]] for a in range(3)], axis=1)

    # F on a 4 mm lattice first: only voxels near the skin need exact work
    step = np.maximum(1, np.round(4.0 / vox).astype(int))
    cidx = [np.arange(0, shape[a], step[a]) for a in range(3)]
    CI = np.stack(np.meshgrid(*cidx, indexing="ij"), -1).reshape(-1, 3)
    fc = ph.implicit(centres_of(CI)).reshape(tuple(len(c) for c in cidx))
    # a fine voxel takes its coarse cell's value (nearest lattice point)
    near_idx = [np.minimum(np.round(np.arange(shape[a]) / step[a]).astype(int), len(cidx[a]) - 1)
                for a in range(3)]
    fcoarse = fc[np.ix_(*near_idx)]
    occ = (fcoarse < 0).astype(np.float32)
    # F changes by at most ~1.3 mm per mm, and a voxel is within half a
    # lattice diagonal of its lattice point
    margin = 0.65 * np.linalg.norm(step * vox) + 1.5
    cand = np.argwhere(np.abs(fcoarse) < margin)
    pc = centres_of(cand)
    f = ph.implicit(pc)
    occ[tuple(cand.T)] = (f < 0)
    # voxels the surface can cross: average a ramp over sub-samples (box filter)
    near = np.abs(f) < 0.9 * np.linalg.norm(vox)
    nsub = np.maximum(1, np.round(sub * vox).astype(int))
    offs = [((np.arange(n) + 0.5) / n - 0.5) * v for n, v in zip(nsub, vox)]
    O = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3)
    ramp = float((vox / nsub).mean())
    pn = pc[near]
    acc = np.zeros(pn.shape[0])
    for o in O:
        acc += np.clip(0.5 - ph.implicit(pn + o) / ramp, 0.0, 1.0)
    occ[tuple(cand[near].T)] = acc / len(O)
    if sinus:
        inside = ph.inside_sinus(pc)
        occ[tuple(cand[inside].T)] = 0.0
    data = 0.05 + 0.95 * occ
    if head_rest:
        # a slab 8 mm behind the head (canonical frame), bright as tissue
        X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
        q = [X * rot[0, a] + Y * rot[1, a] + Z * rot[2, a] for a in range(3)]
        slab = (q[1] < -100.0) & (q[1] > -110.0) & (np.abs(q[0]) < 60) & (np.abs(q[2]) < 60)
        data[slab] = 1.0
    rng = np.random.default_rng(seed)
    data = data + rng.normal(0.0, noise, data.shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vox)
    affine[:3, 3] = origin
    vol = Volume(data=data.astype(np.float32), affine=affine, modality="mr")
    return vol, ph


def resample_rotated(volume: Volume, rotation: np.ndarray, voxel_mm: "float | None" = None) -> Volume:
    """The same scan with the head rotated by ``rotation`` about the volume centre (world).

    The output grid stays aligned to the world axes (like a tilted head in a
    scanner), spaced ``voxel_mm`` (default: the input's smallest voxel), and
    covers the input's extent. Trilinear interpolation; outside is air (the
    volume's minimum).
    """
    from scipy import ndimage as ndi

    A = volume.affine
    zooms = volume.zooms
    h = float(voxel_mm) if voxel_mm is not None else float(zooms.min())
    corners = np.array([[i, j, k] for i in (0, volume.shape[0] - 1) for j in (0, volume.shape[1] - 1)
                        for k in (0, volume.shape[2] - 1)], float)
    world = corners @ A[:3, :3].T + A[:3, 3]
    centre = world.mean(axis=0)
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape = tuple(int(np.ceil((b - a) / h)) + 1 for a, b in zip(lo, hi))
    out_aff = np.eye(4)
    out_aff[:3, :3] = np.eye(3) * h
    out_aff[:3, 3] = lo
    # output voxel j -> world w -> rotated back -> input voxel
    R = np.asarray(rotation, float)
    M = np.linalg.inv(A)[:3, :3] @ R.T @ out_aff[:3, :3]
    off = np.linalg.inv(A)[:3, :3] @ (R.T @ (out_aff[:3, 3] - centre) + centre) + np.linalg.inv(A)[:3, 3]
    data = ndi.affine_transform(volume.data, M, offset=off, output_shape=shape, order=1,
                                cval=float(volume.data.min()))
    return Volume(data=data.astype(np.float32), affine=out_aff, modality=volume.modality, path=volume.path)


def resample_zooms(volume: Volume, voxel_mm) -> Volume:
    """The same scan on a grid of another voxel size (mm; a number or 3 per axis), trilinear.

    The new grid starts at the input's voxel 0 and keeps its axes, so
    ``new_affine = affine @ diag(scale)`` with ``scale = voxel_mm / zooms``;
    it covers the input's extent (no extrapolation).
    """
    from scipy import ndimage as ndi

    zooms = np.broadcast_to(np.asarray(voxel_mm, float), (3,))
    scale = zooms / volume.zooms
    shape = tuple(int(np.floor((s - 1) / sc + 1e-9)) + 1 for s, sc in zip(volume.shape, scale))
    data = ndi.affine_transform(volume.data, np.diag(scale), output_shape=shape, order=1)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(scale)
    return Volume(data=data.astype(np.float32), affine=affine, modality=volume.modality, path=volume.path)


# --------------------------------------------------------------------------- CT head on a head rest
#: Hounsfield units of the CT phantom's materials
CT_AIR, CT_SKIN, CT_BONE, CT_BRAIN = -1000.0, 40.0, 900.0, 35.0


@dataclass(frozen=True)
class HeadRest:
    """A CT head rest: a curved cradle under the back of the head, touching it, and a flat table.

    The cradle is a trough: a cylindrical shell about an axis parallel to z
    (superior), lower half only (posterior, towards the table), cut at
    ``|x| <= half_width`` and ``z_range``. Its inner surface is placed so
    that the back of the head (y = -92 mm on the midline) sinks ``press`` mm
    into it: head and cradle then share a contact patch (soft tissue pressed
    onto the cradle, no air between them), whose size grows with ``press``
    and with how closely ``radius`` matches the occiput's curvature (56 mm
    across, 109 mm along z).

    Attributes (mm, HU)
    -------------------
    radius : inner radius of the trough.
    thickness : wall thickness.
    press : how far the head sinks into the cradle on the midline.
    half_width : the trough is cut at |x| <= half_width (226 mm wide for 113).
    z_range : (z0, z1) extent along the head's axis.
    hu : the cradle's material (plastic ~100..300, foam ~-300..-100).
    table : also a flat table below the cradle (touching the cradle, not the head).
    table_hu : the table's material.
    """

    radius: float = 90.0
    thickness: float = 10.0
    press: float = 4.0
    half_width: float = 113.0
    z_range: tuple = (-80.0, 70.0)
    hu: float = 200.0
    table: bool = True
    table_hu: float = 300.0

    @property
    def axis_y(self) -> float:
        """y (mm) of the trough's axis."""
        return -92.0 + self.press + self.radius

    @property
    def bottom_y(self) -> float:
        """y (mm) of the cradle's outer surface on the midline."""
        return self.axis_y - self.radius - self.thickness

    def signed_distance(self, X, Y, Z) -> np.ndarray:
        """Approximate signed distance (mm, < 0 inside) to the cradle's solid; broadcastable grids."""
        rho = np.sqrt(X * X + (Y - self.axis_y) ** 2)
        d = np.maximum(self.radius - rho, rho - self.radius - self.thickness)
        d = np.maximum(d, Y - self.axis_y)
        d = np.maximum(d, np.abs(X) - self.half_width)
        z0, z1 = self.z_range
        return np.maximum(d, np.maximum(z0 - Z, Z - z1))


def ct_head_phantom(
    voxel_mm=(1.0, 1.0, 1.0),
    *,
    rest: "HeadRest | None" = None,
    noise_hu: float = 20.0,
    seed: int = 0,
    sub: int = 1,
) -> "tuple[Volume, HeadPhantom]":
    """The analytic head as a CT scan (HU), optionally lying in a head rest that touches it.

    The skin surface is :func:`head_phantom`'s (partial-volume edges; air
    sinus), in a field of view 256 mm wide (x), 232 mm deep (y) and 232 mm
    high (z), like a head CT's. Inside: a 7 mm skull (900 HU) 5 mm under the
    skin and brain (35 HU). ``rest`` adds a :class:`HeadRest` (its solid
    minus the head, partial-volume ramp one voxel wide), joined to the skin
    over the contact patch. The same ``voxel_mm`` and ``seed`` with and
    without ``rest`` give the same head voxels and noise, so that the two
    surfaces can be compared directly.

    Returns
    -------
    (Volume, HeadPhantom)
        modality "ct"; the phantom describes the head alone (the truth
        without the rest).
    """
    vox = np.asarray(voxel_mm, float)
    mr, ph = head_phantom(tuple(vox), noise=0.0, sinus=True, sub=sub)
    occ = np.clip((mr.data - 0.05) / 0.95, 0.0, 1.0)
    # widen x from +-88 mm to +-128 mm (a head CT's field is ~250 mm)
    pad = int(np.ceil(40.0 / vox[0]))
    occ = np.pad(occ, ((pad, pad), (0, 0), (0, 0)))
    origin = mr.affine[:3, 3] - np.array([pad * vox[0], 0.0, 0.0])
    axes = [origin[i] + vox[i] * np.arange(occ.shape[i]) for i in range(3)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
    data = (CT_AIR + (CT_SKIN - CT_AIR) * occ).astype(np.float32)
    # skull and brain: ellipsoids 5 and 12 mm inside the skull part of the skin
    c, r = _SKULL

    def inside(inset):
        a = r - inset
        return ((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2 < 1.0

    bone = inside(5.0)
    brain = inside(12.0)
    data[bone] = CT_BONE
    data[brain] = CT_BRAIN
    if rest is not None:
        ramp = float(vox.mean())
        parts = [(rest.signed_distance(X, Y, Z), rest.hu)]
        if rest.table:
            top = rest.bottom_y
            # 10 mm thick, across the whole field, the length of the scan
            d_tab = np.maximum(Y - top, top - 10.0 - Y) + 0.0 * X + 0.0 * Z
            parts.append((d_tab, rest.table_hu))
        for d, hu in parts:
            frac = np.clip(0.5 - d / ramp, 0.0, 1.0).astype(np.float32)
            # the rest fills what the head leaves free (pressed soft tissue)
            frac = np.minimum(frac, 1.0 - occ)
            data += frac * np.float32(hu - CT_AIR)
    rng = np.random.default_rng(seed)
    data += rng.normal(0.0, noise_hu, data.shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vox)
    affine[:3, 3] = origin
    return Volume(data=data, affine=affine, modality="ct"), ph
