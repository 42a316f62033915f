"""The built-in defacing methods: ``mask``, ``plane``, ``blur`` and ``reface``.

Each is ``fn(volume, context, **options) -> (new array, region)`` and is
registered in :mod:`mriface.deface.core`'s registry on import; the brain
protection and the counts are applied by :func:`~mriface.deface.core.run_method`.
"""

from __future__ import annotations

import numpy as np

from ..volume import Volume
from .core import DefaceContext, DefaceError, register_method

__all__ = ["mask_face", "plane_cut", "blur_face", "reface", "background_value"]


def background_value(volume: Volume) -> float:
    """The value defaced voxels get: 0, or the scan's minimum when the scan never reaches 0."""
    lo, hi = float(volume.data.min()), float(volume.data.max())
    return float(np.clip(0.0, lo, hi))


def _box(mask: np.ndarray, pad: np.ndarray) -> "tuple[slice, slice, slice]":
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _inner_weight(region: np.ndarray, zooms: np.ndarray, edge_mm: float) -> np.ndarray:
    """0 outside ``region``, rising to 1 at ``edge_mm`` inside its border: a seamless blend."""
    from scipy import ndimage as ndi

    if edge_mm <= 0:
        return region.astype(np.float32)
    d = ndi.distance_transform_edt(region, sampling=zooms)
    return np.clip(d / edge_mm, 0.0, 1.0).astype(np.float32)


def _require_region(volume: Volume, context: DefaceContext, method: str) -> None:
    if not context.face.any():
        raise DefaceError(f"{volume.name}: the face region is empty on this scan's grid ({method}); "
                          "is the face inside the field of view?")


def mask_face(volume: Volume, context: DefaceContext, *, fill: "float | None" = None):
    """pydeface's approach: set the registered face region to the background value.

    Parameters
    ----------
    fill : float, optional
        The value to write (default :func:`background_value`).
    """
    _require_region(volume, context, "mask")
    out = volume.data.copy()
    out[context.face] = background_value(volume) if fill is None else float(fill)
    return out, context.face


def plane_cut(volume: Volume, context: DefaceContext, *, buffer_mm: float = 2.0,
              angle_deg: "float | None" = None, fill: "float | None" = None):
    """quickshear's idea: cut along a plane tangent to the brain mask, on the face's side.

    The brain-protection mask is mapped into the template's world and
    projected onto its mid-sagittal (anterior, superior) plane. Of the edges
    of that outline's convex hull, the one whose outward normal points most
    nearly at the face (:attr:`Template.face_direction`) defines the cut:
    every voxel more than ``buffer_mm`` beyond that line, towards the face,
    is set to the background. The cut is a plane in the scan (the map is
    affine), symmetric left-right in the template's frame.

    Parameters
    ----------
    buffer_mm : float
        Distance kept between the brain mask's tangent and the cut (mm, template frame).
    angle_deg : float or None
        Pick the hull edge whose normal is nearest this many degrees below
        the template's anterior axis instead of the face direction (about 43
        degrees below); smaller angles pick steeper cuts when the hull has
        such an edge. None: the face direction.
    fill : float, optional
        The value to write (default :func:`background_value`).
    """
    from scipy.spatial import ConvexHull

    brain = context.brain
    if not brain.any():
        raise DefaceError(f"{volume.name}: the brain-protection mask is empty; cannot place the cut plane")
    T = context.registration.scan_to_template
    M = T @ volume.affine  # scan voxel -> template world
    step = max(1, int(round(2.0 / float(volume.zooms.min()))))  # 2 mm is plenty for a hull
    sub = np.zeros_like(brain)
    sub[::step, ::step, ::step] = brain[::step, ::step, ::step]
    idx = np.argwhere(sub).astype(float)
    yz = idx @ M[1:3, :3].T + M[1:3, 3]
    hull = ConvexHull(yz)
    if angle_deg is None:
        d = context.template.face_direction[1:3]
        d = d / np.linalg.norm(d)
    else:
        a = np.deg2rad(float(angle_deg))
        d = np.array([np.cos(a), -np.sin(a)])
    normals, offsets = hull.equations[:, :2], hull.equations[:, 2]  # n . x + offset <= 0 inside
    k = int(np.argmax(normals @ d))
    n, c = normals[k], -offsets[k]
    # n . yz(ijk) is affine in the voxel index: sum three 1-D terms instead of a full grid of points
    w = n @ M[1:3, :3]
    b = n @ M[1:3, 3]
    X, Y, Z = (np.arange(s, dtype=np.float32) for s in volume.shape)
    f = (w[0] * X)[:, None, None] + (w[1] * Y)[None, :, None] + (w[2] * Z)[None, None, :] + np.float32(b)
    region = f > c + buffer_mm
    out = volume.data.copy()
    out[region] = background_value(volume) if fill is None else float(fill)
    return out, region


def blur_face(volume: Volume, context: DefaceContext, *, sigma_mm: float = 8.0, edge_mm: float = 3.0):
    """Smooth the face region instead of removing it (pydeface issue 12).

    The region is replaced by a Gaussian blur of the scan (``sigma_mm``),
    blended in over ``edge_mm`` inside the region's border so that no edge
    appears; voxels outside the region are untouched.
    """
    from scipy import ndimage as ndi

    _require_region(volume, context, "blur")
    z = volume.zooms
    box = _box(context.face, np.ceil(3 * sigma_mm / z).astype(int))
    sub = volume.data[box]
    blurred = ndi.gaussian_filter(sub, sigma=sigma_mm / z, mode="nearest", truncate=3.0)
    w = _inner_weight(context.face[box], z, edge_mm)
    out = volume.data.copy()
    out[box] = sub * (1 - w) + blurred * w
    return out, context.face


def reface(volume: Volume, context: DefaceContext, *, edge_mm: float = 3.0, shell_mm: float = 15.0):
    """mri_reface's idea: replace the face by the registered average face, intensity-matched.

    The average head is resampled onto the scan around the face region. Its
    intensities are mapped onto the scan's by matching quantiles (1st to
    99th percentile) over a shell of ``shell_mm`` just outside the region,
    where both show the same anatomy, and the result is blended in over
    ``edge_mm`` inside the region's border.
    """
    from scipy import ndimage as ndi

    _require_region(volume, context, "reface")
    z = volume.zooms
    box = _box(context.face, np.ceil(shell_mm / z).astype(int) + 1)
    region = context.face[box]
    sub = volume.data[box]
    avg = context.template_to_scan(context.template.head.data, volume, order=1, box=box)
    shell = ~region & (ndi.distance_transform_edt(~region, sampling=z) <= shell_mm)
    if shell.sum() < 100:
        raise DefaceError(f"{volume.name}: too little scan around the face region to match intensities (reface)")
    q = np.linspace(1, 99, 50)
    sq = np.percentile(sub[shell], q)
    tq = np.percentile(avg[shell], q)
    # np.interp needs increasing knots: air fills many quantiles with one value
    span = max(float(tq[-1] - tq[0]), 1e-6)
    tq = np.maximum.accumulate(tq) + np.arange(q.size) * span * 1e-6
    mapped = np.interp(avg, tq, sq).astype(np.float32)
    w = _inner_weight(region, z, edge_mm)
    out = volume.data.copy()
    out[box] = sub * (1 - w) + mapped * w
    return out, context.face


register_method("mask", mask_face, description="zero the registered face region (pydeface's approach)")
register_method("plane", plane_cut, description="cut along a plane tangent to the brain mask (quickshear's idea)")
register_method("blur", blur_face, description="Gaussian-blur the face region")
register_method("reface", reface, description="replace the face by the intensity-matched average face (mri_reface's idea)")
