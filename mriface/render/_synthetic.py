"""Small surfaces for tests, benchmarks and docs (not part of the public API).

``synthetic_head`` is an ellipsoid with a nose, built analytically; the
``quick_surface`` fallback turns a sample volume into a HeadSurface with a
plain marching-cubes threshold and a face frame found from the nose tip,
for use until (or instead of) :func:`mriface.surface.extract_head_surface`.
"""

from __future__ import annotations

import numpy as np

from ..surface import FaceFrame, HeadSurface

__all__ = ["synthetic_head", "quick_surface", "sample_head", "jitter_surface"]


def _normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return (vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def synthetic_head(n_lat: int = 48, n_lon: int = 64, *, nose: bool = True) -> HeadSurface:
    """An ellipsoidal 'head' (mm, world RAS+) looking towards +y with a bump of a nose.

    Semi-axes 75 (x) by 95 (y) by 115 (z) mm, centred at the origin; the
    face frame's centre is 80 mm in front of the origin, forward = +y,
    up = +z. ``2 * (n_lat - 1) * n_lon`` triangles, CCW from outside.
    """
    th = np.linspace(0, np.pi, n_lat)  # polar angle from +z
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    d = np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1)
    r = 1.0 / np.sqrt((d[..., 0] / 75) ** 2 + (d[..., 1] / 95) ** 2 + (d[..., 2] / 115) ** 2)
    if nose:
        # a Gaussian bump along +y slightly below the equator
        ang = np.arccos(np.clip(d @ np.array([0, np.cos(0.15), -np.sin(0.15)]), -1, 1))
        r = r + 22 * np.exp(-(ang / 0.18) ** 2)
    verts = (d * r[..., None]).reshape(-1, 3)
    idx = np.arange(n_lat * n_lon).reshape(n_lat, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, e = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, e], -1).reshape(-1, 3), np.stack([a, e, b], -1).reshape(-1, 3)])
    # drop the degenerate triangles at the poles and unused pole duplicates
    tri = verts[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    faces = faces[area > 1e-9]
    used = np.unique(faces)
    remap = np.full(len(verts), -1)
    remap[used] = np.arange(len(used))
    verts = verts[used].astype(np.float32)
    faces = remap[faces].astype(np.int64)
    # orient CCW from outside
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = (fn * tri.mean(1)).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    frame = FaceFrame(np.array([0.0, 80.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    return HeadSurface(verts, faces, _normals(verts, faces), frame)


def quick_surface(path, *, step: int = 1, level: "float | None" = None, smooth_mm: float = 1.5) -> HeadSurface:
    """Marching-cubes skin surface of a head volume with a nose-tip face frame.

    Parameters
    ----------
    path : path of a NIfTI head volume (any orientation; reoriented to RAS+).
    step : marching-cubes step in voxels (2 quarters the triangle count).
    smooth_mm : Gaussian sigma (voxels) applied to the intensities before
        thresholding; 0 thresholds the raw scan (a rougher, larger mesh: the
        pydeface mean head gives about 860k triangles, used by the benchmark).
    level : iso level; default half of Otsu's threshold (keeps the thin,
        dim skin of averaged heads and of fat-suppressed scans).

    The frame: forward = +y (anterior), up = +z; centre 25 mm behind and 15 mm
    above the nose tip (the most anterior point near the midline).
    """
    import nibabel as nib
    from scipy import ndimage
    from skimage.measure import marching_cubes

    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    if level is None:
        from skimage.filters import threshold_otsu

        level = 0.5 * float(threshold_otsu(vol[::2, ::2, ::2]))
    # smooth the intensities first: thin skin in noisy scans otherwise breaks into speckle
    mask = (ndimage.gaussian_filter(vol, smooth_mm) if smooth_mm > 0 else vol) > level
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_fill_holes(mask)
    sm = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
    sm = np.pad(sm, 1)
    v, f, _, _ = marching_cubes(sm, 0.5, step_size=step)
    v = v - 1.0
    world = (v @ img.affine[:3, :3].T + img.affine[:3, 3]).astype(np.float32)
    # marching_cubes' winding depends on the gradient direction: orient faces so normals point out
    faces = f.astype(np.int64)
    tri = world[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if float((fn * (tri.mean(1) - world.mean(0))).sum()) < 0:
        faces = faces[:, ::-1].copy()
    mid_x = float(np.median(world[:, 0]))
    near_mid = np.abs(world[:, 0] - mid_x) < 8
    tip = world[near_mid][np.argmax(world[near_mid, 1])]
    center = tip.astype(np.float64) + np.array([0.0, -25.0, 15.0])
    frame = FaceFrame(center, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    return HeadSurface(world, faces, _normals(world, faces), frame)


def sample_head(name: str, *, step: int = 1) -> HeadSurface:
    """A sample head's surface: :func:`mriface.surface.extract_head_surface` when it exists, else :func:`quick_surface`.

    ``step`` > 1 gives a coarser mesh (quick_surface only; otherwise the
    surface is decimated by keeping its own resolution).
    """
    from .. import datasets

    path = datasets.fetch(name)
    from .. import surface as _surface

    if step == 1 and hasattr(_surface, "extract_head_surface"):
        from ..volume import load_volume

        return _surface.extract_head_surface(load_volume(path))
    return quick_surface(path, step=step)


def jitter_surface(surface: HeadSurface, rng: np.random.Generator, *, scale: float = 0.06, noise_mm: float = 0.0) -> HeadSurface:
    """A plausible 'other subject': anisotropic scaling about the face centre (+-``scale``)."""
    s = 1.0 + rng.uniform(-scale, scale, size=3)
    c = np.asarray(surface.frame.center, np.float32)
    verts = ((surface.verts - c) * s + c).astype(np.float32)
    if noise_mm:
        verts = verts + rng.normal(0, noise_mm, size=verts.shape).astype(np.float32)
    normals = surface.normals / s
    normals = (normals / np.linalg.norm(normals, axis=1, keepdims=True)).astype(np.float32)
    return HeadSurface(verts, surface.faces, normals, surface.frame)
