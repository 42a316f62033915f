"""Reconstruct the skin surface of a head and locate its face.

Stage 2 of the data flow (``Volume -> HeadSurface``).

:func:`extract_head_surface` turns a :class:`~mriface.volume.Volume` into the
closed outer skin surface with its :class:`FaceFrame`; :func:`load_surface`
reads a mesh another tool made (OBJ, PLY, GIfTI, FreeSurfer) and finds the
face on it the same way. ``docs/surface.md`` explains the method and defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError, SurfaceError
from .volume import Volume

__all__ = [
    "FaceFrame",
    "HeadSurface",
    "crop_face",
    "save_surface_npz",
    "load_surface_npz",
    "extract_head_surface",
    "estimate_threshold",
    "ThresholdEstimate",
    "estimate_face_frame",
    "marching_cubes_torch",
    "mesh_topology",
    "vertex_normals",
    "taubin_smooth",
    "load_surface",
    "save_surface",
]


@dataclass(frozen=True, eq=False)
class FaceFrame:
    """Where the face is and which way it looks, in world RAS+ millimetres.

    Attributes
    ----------
    center : numpy.ndarray
        (3,) float64, mm. The middle of the face: the point cameras look at.
        It lies inside the head just behind the skin of the mid-face (about
        the height of the nose bridge / cheekbones), on the midline.
    forward : numpy.ndarray
        (3,) unit vector pointing out of the face (anterior for an upright,
        untilted head).
    up : numpy.ndarray
        (3,) unit vector orthogonal to ``forward`` pointing to the top of the
        head (superior for an untilted head).
    """

    center: np.ndarray
    forward: np.ndarray
    up: np.ndarray

    @property
    def right(self) -> np.ndarray:
        """(3,) unit ``up x forward``: image right for a camera facing the face.

        That is the subject's *left*; (right, up, forward) is right-handed, like
        an OpenGL camera's (x, y, z) when the camera looks along ``-forward``.
        """
        return np.cross(self.up, self.forward)

    def basis(self) -> np.ndarray:
        """3x3 matrix whose columns are ``right``, ``up``, ``forward`` (face -> world rotation)."""
        return np.stack([self.right, self.up, self.forward], axis=1)


@dataclass(frozen=True, eq=False)
class HeadSurface:
    """A triangle mesh of the skin with its face frame.

    Attributes
    ----------
    verts : numpy.ndarray
        (V, 3) float32 vertex positions, mm, world RAS+.
    faces : numpy.ndarray
        (F, 3) int64 vertex indices, counter-clockwise seen from outside, so
        that triangle normals point out of the head.
    normals : numpy.ndarray
        (V, 3) float32 unit vertex normals pointing out of the head.
    frame : FaceFrame
        The face's position and orientation.
    """

    verts: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    frame: FaceFrame

    @property
    def n_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])


def crop_face(surface: HeadSurface, *, behind_mm: float = 30.0) -> HeadSurface:
    """Keep only the front of the head: the part a camera facing the face can see.

    A triangle is kept when all three vertices lie less than ``behind_mm``
    behind the plane through ``frame.center`` orthogonal to ``frame.forward``.
    Cameras within about 60 degrees of frontal never see the rest, and
    dropping it roughly halves ray-casting and rasterization work.

    Parameters
    ----------
    surface : HeadSurface
        Whole head, mm.
    behind_mm : float
        How far behind the face centre (mm, along ``-forward``) to keep.

    Returns
    -------
    HeadSurface
        A new surface with unused vertices removed; same frame.

    Examples
    --------
    >>> import numpy as np
    >>> frame = FaceFrame(np.zeros(3), np.array([0., 1, 0]), np.array([0., 0, 1]))
    >>> verts = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, -50, 0]], np.float32)
    >>> faces = np.array([[0, 1, 2], [0, 1, 3]])
    >>> s = HeadSurface(verts, faces, np.tile([[0., 1, 0]], (4, 1)).astype(np.float32), frame)
    >>> crop_face(s, behind_mm=30).n_faces
    1
    """
    depth = (surface.verts - surface.frame.center) @ surface.frame.forward
    keep_vert = depth > -behind_mm
    keep_face = keep_vert[surface.faces].all(axis=1)
    faces = surface.faces[keep_face]
    used = np.unique(faces)
    remap = np.full(surface.n_verts, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return HeadSurface(
        verts=surface.verts[used],
        faces=remap[faces],
        normals=surface.normals[used],
        frame=surface.frame,
    )


def save_surface_npz(surface: HeadSurface, path) -> None:
    """Write a surface to a compressed ``.npz`` (atomic), for caching between runs."""
    from ._io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, verts=surface.verts, faces=surface.faces, normals=surface.normals,
                center=surface.frame.center, forward=surface.frame.forward, up=surface.frame.up,
            )


def load_surface_npz(path) -> HeadSurface:
    """Read a surface written by :func:`save_surface_npz`."""
    with np.load(path) as z:
        frame = FaceFrame(z["center"], z["forward"], z["up"])
        return HeadSurface(z["verts"], z["faces"], z["normals"], frame)


# =========================================================================== extraction
#: Bourke's cube corner numbering: corner i sits at this (dx, dy, dz) offset
_CORNERS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]],
    dtype=np.int64,
)
#: Bourke's edge numbering: edge e joins these two corners
_EDGES = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]],
    dtype=np.int64,
)


@dataclass(frozen=True)
class ThresholdEstimate:
    """Intensity levels of one scan (its own units).

    Attributes
    ----------
    threshold : float
        Skin/air iso-level: midway between ``air`` and ``skin``.
    air : float
        Typical (median) intensity of the air around the head.
    skin : float
        Typical (median) intensity of the tissue just inside the skin.
    contrast : float
        ``(skin - air)`` divided by the robust spread of the air: a head scan
        gives tens, pure noise about 2.
    """

    threshold: float
    air: float
    skin: float
    contrast: float


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1D float sample (256-bin histogram)."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values, nbins=256))


def _block_mean(data: np.ndarray, k: "tuple[int, int, int]") -> np.ndarray:
    """Mean over (kx, ky, kz) blocks; the array is edge-padded to whole blocks.

    Returns
    -------
    numpy.ndarray
        float32 (ceil(X/kx), ceil(Y/ky), ceil(Z/kz)); coarse voxel c covers
        fine voxels ``c*k .. c*k + k - 1``.
    """
    pad = [(0, (-s) % kk) for s, kk in zip(data.shape, k)]
    if any(p[1] for p in pad):
        data = np.pad(data, pad, mode="edge")
    # strided adds along one axis at a time: several times faster than a
    # reshape-and-mean over 6 axes for block sizes of 2-4
    out = data
    for ax, kk in enumerate(k):
        if kk == 1:
            continue
        sl = [slice(None)] * 3
        sl[ax] = slice(0, None, kk)
        acc = out[tuple(sl)].astype(np.float32, copy=True)
        for j in range(1, kk):
            sl[ax] = slice(j, None, kk)
            acc += out[tuple(sl)]
        out = acc
    if out is data:
        return data.astype(np.float32, copy=True)
    out *= np.float32(1.0 / (k[0] * k[1] * k[2]))
    return out


def estimate_threshold(volume: Volume, *, coarse_mm: float = 2.0, _coarse=None) -> ThresholdEstimate:
    """Choose the skin/air iso-level of a scan from its own intensities.

    On a block-averaged copy, Otsu's threshold gives a rough head. ``air`` is
    the median of everything more than 6 mm outside it, ``skin`` the median of
    the shell 2-6 mm inside its boundary (skin and subcutaneous fat: no
    brain), and the level is midway between them; the rough head is then
    redrawn at that level and the estimate repeated once. Midway is where a
    partial-volume edge crosses, which puts the surface on the true boundary.
    For CT the level is clamped to the skin range -500..-200 HU.

    Parameters
    ----------
    volume : Volume
    coarse_mm : float
        Block size (mm) of the averaged copy.

    Returns
    -------
    ThresholdEstimate

    Raises
    ------
    SurfaceError
        When the scan shows no air/tissue contrast (e.g. pure noise).
    """
    from scipy import ndimage as ndi

    # medians need no detail: twice the segmentation block size is plenty
    k = _block_factors(volume.zooms, 2.0 * coarse_mm)
    if _coarse is not None and all(kk % kc == 0 for kk, kc in zip(k, _coarse[1])):
        # reuse the segmentation grid's block means (same result, less work)
        coarse = _block_mean(_coarse[0], tuple(kk // kc for kk, kc in zip(k, _coarse[1])))
    else:
        coarse = _block_mean(volume.data, k)
    cmm = float((np.asarray(k) * volume.zooms).min())
    lo, hi = np.percentile(coarse, [0.5, 99.5])
    t = _otsu(np.clip(coarse, lo, hi).ravel())
    r_air = max(1, int(round(6.0 / cmm)))
    # the shell is eroded-once minus eroded-r_skin times: r_skin must be >= 2
    # or the shell is empty (coarse voxels over 4 mm, e.g. 2.05-2.5 mm scans
    # averaged in 2x2x2 blocks, round 6 mm down to one voxel)
    r_skin = max(2, int(round(6.0 / cmm)))
    for _ in range(2):
        rough = coarse > t
        air_vox = coarse[~ndi.binary_dilation(rough, iterations=r_air)]
        shell = ndi.binary_erosion(rough, iterations=1) & ~ndi.binary_erosion(rough, iterations=r_skin)
        skin_vox = coarse[shell]
        if air_vox.size < 64 or skin_vox.size < 64:
            raise SurfaceError(
                f"{volume.name}: no head found (no air around an object, or no object): "
                "is this a head scan with air around the head?"
            )
        air, skin = float(np.median(air_vox)), float(np.median(skin_vox))
        t = 0.5 * (air + skin)
    if volume.modality == "ct":
        t = float(np.clip(t, -500.0, -200.0))
    spread = 1.4826 * float(np.median(np.abs(air_vox - air)))
    contrast = (skin - air) / max(spread, 1e-3 * abs(skin - air), 1e-30)
    return ThresholdEstimate(threshold=float(t), air=air, skin=skin, contrast=float(contrast))


def _block_factors(zooms: np.ndarray, coarse_mm: float) -> "tuple[int, int, int]":
    return tuple(max(1, int(round(coarse_mm / float(z)))) for z in zooms)  # type: ignore[return-value]


#: below this air/tissue contrast a scan is taken to hold no head (pure noise gives ~2-3)
_MIN_CONTRAST = 6.0
#: a head is at least this big (mm^3; a neonate's head is ~400 cm^3)
_MIN_HEAD_MM3 = 100_000.0


def _fill_holes(mask: np.ndarray, axis: "int | None") -> np.ndarray:
    """``mask`` plus every background region that does not reach the array's border.

    ``axis=None`` works in 3D; ``axis=a`` treats each slice across axis ``a``
    separately (a region is a hole when it is closed within its slice).
    One labelling pass instead of scipy's iterated dilation: much faster.
    """
    from scipy import ndimage as ndi

    if axis is None:
        st = ndi.generate_binary_structure(3, 1)
    else:
        st = np.zeros((3, 3, 3), bool)
        sl = [slice(None)] * 3
        sl[axis] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
    labels, n = ndi.label(~mask, structure=st)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for ax in range(3):
        if ax == axis:
            continue
        outside[np.unique(labels.take(0, axis=ax))] = True
        outside[np.unique(labels.take(-1, axis=ax))] = True
    outside[0] = True
    return mask | ~outside[labels]


@dataclass(frozen=True)
class _HeadMasks:
    """Coarse-grid masks (shape of the block-averaged volume)."""

    head: np.ndarray      # the head: largest object, internal air not filled
    interior: np.ndarray  # certainly inside: filled head, eroded
    exterior: np.ndarray  # certainly air: far from the head
    k: tuple              # block factors


def _head_masks(volume: Volume, est: ThresholdEstimate, coarse_mm: float, coarse=None) -> _HeadMasks:
    """Segment the head on the coarse grid: remove other objects, fill internal air."""
    from scipy import ndimage as ndi

    k = _block_factors(volume.zooms, coarse_mm)
    if coarse is None:
        coarse = _block_mean(volume.data, k)
    cmm = np.asarray(k) * volume.zooms
    # a lower level than the iso-level keeps thin parts (ears, nose tip) that
    # block averaging dims below it
    mask = coarse > est.air + 0.5 * (est.threshold - est.air)
    # an opening cuts thin bridges to padding, head rests and markers
    opened = ndi.binary_opening(mask, iterations=1)
    labels, n = ndi.label(opened)
    if n == 0:
        raise SurfaceError(f"{volume.name}: no head found: nothing above the skin threshold {est.threshold:g}")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    r_grow = max(1, int(round(20.0 / cmm.min())))
    r_in = max(1, int(np.ceil(4.0 / cmm.min())))
    r_out = max(1, int(np.ceil(6.0 / cmm.min())))
    # everything below happens near the largest object: work on bounding
    # boxes with margins instead of the whole scan (a third of its voxels)
    lab = int(np.argmax(sizes))
    grow_box = _margin_box(labels == lab, r_grow)
    head = np.zeros(mask.shape, bool)
    # grow back what the opening shaved off (ears, nose), but only ~2 cm
    head[grow_box] = ndi.binary_dilation(labels[grow_box] == lab, iterations=r_grow, mask=mask[grow_box])
    # the head's box plus r_out and one voxel more, so that the background
    # touching the box's border is the air around the head, as at the
    # array's border
    crop = _margin_box(head, r_out + 1)
    head_c = head[crop]
    head_mm3 = float(np.count_nonzero(head_c) * np.prod(cmm))
    if est.contrast < _MIN_CONTRAST or head_mm3 < _MIN_HEAD_MM3:
        raise SurfaceError(
            f"{volume.name}: no head found (air/tissue contrast {est.contrast:.1f}, largest object "
            f"{head_mm3 / 1000:.0f} cm^3); is this a head scan? Give a volume showing the whole face"
        )
    filled = _fill_holes(head_c, None)
    # sinuses, airway and ear canals open to the outside in 3D but are closed
    # rings in slices across them
    for axis in range(3):
        filled |= _fill_holes(head_c, axis)
    # border_value=1: the head may be cut by the scan's edge (neck, chin);
    # that cut is not skin and must not erode the interior. Where the box is
    # inside the array its border is air (the margin), so this changes nothing.
    interior_c = ndi.binary_erosion(filled, iterations=r_in, border_value=1)
    # from the filled head, so that certain air never touches certain tissue
    exterior_c = ~ndi.binary_dilation(filled, iterations=r_out)
    interior = np.zeros(mask.shape, bool)
    exterior = np.ones(mask.shape, bool)
    interior[crop], exterior[crop] = interior_c, exterior_c
    return _HeadMasks(head=head, interior=interior, exterior=exterior, k=k)


def _margin_box(mask: np.ndarray, margin: int) -> "tuple[slice, slice, slice]":
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(0, int(nz[0]) - margin), min(mask.shape[ax], int(nz[-1]) + 1 + margin)))
    return tuple(box)


# --------------------------------------------------------------------------- grid, field
@dataclass(frozen=True)
class _Grid:
    """The isotropic working grid: work index j -> original voxel index ``lo + j * step``."""

    lo: np.ndarray    # (3,) original voxel index of work voxel 0
    step: np.ndarray  # (3,) original voxels per work voxel (voxel_mm / zooms)
    shape: tuple      # work grid shape


def _catmull_rom_weights(t):
    """Weights of the 4 taps (-1, 0, 1, 2) of Catmull-Rom cubic interpolation at fraction t."""
    t2, t3 = t * t, t * t * t
    return (
        0.5 * (-t3 + 2 * t2 - t),
        0.5 * (3 * t3 - 5 * t2 + 2),
        0.5 * (-3 * t3 + 4 * t2 + t),
        0.5 * (t3 - t2),
    )


def _resample_axis_np(a: np.ndarray, axis: int, start: float, step: float, n: int) -> np.ndarray:
    """Catmull-Rom samples of ``a`` along ``axis`` at ``start + step * arange(n)`` (index units)."""
    pos = start + step * np.arange(n, dtype=np.float64)
    i0 = np.floor(pos).astype(np.int64)
    t = (pos - i0).astype(np.float32)
    last = a.shape[axis] - 1
    shape = [1, 1, 1]
    shape[axis] = n
    out = np.empty(a.shape[:axis] + (n,) + a.shape[axis + 1:], np.float32)
    buf = np.empty_like(out)
    # one scratch array for the four taps: fresh full-size temporaries cost
    # as much in page faults as the arithmetic
    for j, (off, w) in enumerate(zip((-1, 0, 1, 2), _catmull_rom_weights(t))):
        dst = out if j == 0 else buf
        np.take(a, np.clip(i0 + off, 0, last), axis=axis, out=dst)
        dst *= w.reshape(shape)
        if j:
            out += buf
    return out


def _resample_axis_torch(a, axis: int, start: float, step: float, n: int):
    """Torch twin of :func:`_resample_axis_np` (same formula, any device)."""
    import torch

    pos = start + step * torch.arange(n, dtype=torch.float64, device=a.device)
    i0 = torch.floor(pos).long()
    t = (pos - i0).float()
    last = a.shape[axis] - 1
    shape = [1, 1, 1]
    shape[axis] = n
    out = None
    for off, w in zip((-1, 0, 1, 2), _catmull_rom_weights(t)):
        term = torch.index_select(a, axis, torch.clamp(i0 + off, 0, last)) * w.reshape(shape)
        out = term if out is None else out + term
    return out


def _gauss_kernel(sigma_vox: float) -> np.ndarray:
    """Normalised 1D Gaussian taps, radius ceil(3 sigma)."""
    r = max(1, int(np.ceil(3.0 * sigma_vox)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_vox) ** 2)
    return (w / w.sum()).astype(np.float32)


def _smooth_torch(a, sigma_vox: float):
    import torch
    import torch.nn.functional as F

    if sigma_vox <= 0:
        return a
    w = torch.from_numpy(_gauss_kernel(sigma_vox)).to(a.device)
    r = (w.numel() - 1) // 2
    x = a[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = w.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), w.reshape(shape))
    return x[0, 0]


def _work_grid(volume: Volume, masks: _HeadMasks, voxel_mm: float) -> _Grid:
    """Isotropic grid over the head's bounding box (plus the air margin)."""
    near = ~masks.exterior
    idx = [np.flatnonzero(near.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    k = np.asarray(masks.k)
    lo = np.array([i[0] for i in idx]) * k
    hi = np.minimum((np.array([i[-1] for i in idx]) + 1) * k, volume.shape) - 1
    step = voxel_mm / volume.zooms
    n = (hi - lo) / step
    # a step that drifts less than 1/20 voxel over the whole grid is the
    # native one: header round-off (0.99999736 mm) must not cost a cubic
    # resampling of the whole scan
    step = np.where(np.abs(step - 1.0) * (n + 1) < 0.05, 1.0, step)
    shape = tuple(int(np.floor((h - l) / s + 1e-6)) + 1 for l, h, s in zip(lo, hi, step))
    return _Grid(lo=lo.astype(np.float64), step=step.astype(np.float64), shape=shape)


def _fine_masks(masks: _HeadMasks, grid: _Grid):
    """Coarse masks looked up at each work voxel: (interior, exterior), work-grid shape."""
    idx = []
    for ax in range(3):
        o = grid.lo[ax] + grid.step[ax] * np.arange(grid.shape[ax])
        c = np.floor((o + 0.5) / masks.k[ax]).astype(np.int64)
        idx.append(np.clip(c, 0, masks.head.shape[ax] - 1))
    # one axis at a time: 3-4x faster than a single np.ix_ gather
    out = []
    for m in (masks.interior, masks.exterior):
        for ax in range(3):
            m = np.take(m, idx[ax], axis=ax)
        out.append(m)
    return out[0], out[1]


def _forced_levels(est: ThresholdEstimate, threshold: float) -> "tuple[float, float]":
    """Values written into certain air / certain tissue: clearly on their side of the level."""
    span = max(abs(est.skin - est.air), 1e-6 * max(abs(threshold), 1.0))
    return min(est.air, threshold) - 0.5 * span, max(est.skin, threshold) + 0.5 * span


def _field_np(volume: Volume, grid: _Grid, sigma_vox: float, inner, outer, lo_val, hi_val) -> np.ndarray:
    """Resampled, smoothed, forced and padded intensity on the work grid (numpy)."""
    a = volume.data
    sl = []
    for ax in range(3):
        if abs(grid.step[ax] - 1.0) < 1e-9 and float(grid.lo[ax]).is_integer():
            sl.append(slice(int(grid.lo[ax]), int(grid.lo[ax]) + grid.shape[ax]))
        else:
            sl.append(slice(None))
    a = a[tuple(sl)]
    owned = False
    for ax in range(3):
        if sl[ax] == slice(None):
            a = _resample_axis_np(a, ax, grid.lo[ax], grid.step[ax], grid.shape[ax])
            owned = True
    out = np.empty(tuple(s + 2 for s in a.shape), dtype=np.float32)
    for ax in range(3):
        out[(slice(None),) * ax + (0,)] = lo_val
        out[(slice(None),) * ax + (-1,)] = lo_val
    inner_view = out[1:-1, 1:-1, 1:-1]
    if sigma_vox > 0:
        # the three 1D passes ping-pong between the output and one scratch
        # array: every fresh array of this size (> 32 MB, so mmap'ed by
        # malloc) costs as much in page faults as a filter pass
        w = _gauss_kernel(sigma_vox)
        from scipy import ndimage as ndi

        # (a resampled copy is free to overwrite once read)
        tmp = a if owned else np.empty(a.shape, np.float32)
        ndi.correlate1d(a, w, axis=0, output=inner_view, mode="nearest")
        ndi.correlate1d(inner_view, w, axis=1, output=tmp, mode="nearest")
        ndi.correlate1d(tmp, w, axis=2, output=inner_view, mode="nearest")
    else:
        inner_view[...] = a
    np.maximum(inner_view, np.float32(hi_val), out=inner_view, where=inner)
    np.minimum(inner_view, np.float32(lo_val), out=inner_view, where=outer)
    # the 1-voxel frame of lo_val is a margin of air: a head cut by the
    # scan's edge still closes
    return out


def _field_torch(volume: Volume, grid: _Grid, sigma_vox: float, inner, outer, lo_val, hi_val, device):
    """Torch twin of :func:`_field_np`; returns a float32 tensor on ``device``."""
    import torch
    import torch.nn.functional as F

    a = torch.as_tensor(np.ascontiguousarray(volume.data, dtype=np.float32)).to(device)
    for ax in range(3):
        if abs(grid.step[ax] - 1.0) < 1e-9 and float(grid.lo[ax]).is_integer():
            a = a.narrow(ax, int(grid.lo[ax]), grid.shape[ax])
        else:
            a = _resample_axis_torch(a, ax, float(grid.lo[ax]), float(grid.step[ax]), grid.shape[ax])
    a = _smooth_torch(a.contiguous(), sigma_vox)
    inner_t = torch.from_numpy(inner).to(device)
    outer_t = torch.from_numpy(outer).to(device)
    a = torch.where(inner_t, torch.clamp(a, min=hi_val), a)
    a = torch.where(outer_t, torch.clamp(a, max=lo_val), a)
    return F.pad(a[None, None], (1, 1, 1, 1, 1, 1), mode="constant", value=lo_val)[0, 0]


# --------------------------------------------------------------------------- marching cubes
def marching_cubes_torch(field, level: float):
    """Marching cubes in torch (CPU or CUDA), Bourke's 256-case table.

    The table (``pytorch3d.ops.marching_cubes_data.FACE_TABLE``) treats each
    ambiguous cube face the same way from both cubes that share it, so the
    mesh is closed wherever the field is; vertices are shared through unique
    grid-edge ids. Run in plain torch ops so that CPU and CUDA give the same
    mesh.

    Parameters
    ----------
    field : torch.Tensor
        (X, Y, Z) float32 scalar field; inside is ``field > level``.
    level : float
        Iso-level.

    Returns
    -------
    verts : torch.Tensor
        (V, 3) float32 positions in voxel index units (axis order X, Y, Z).
    faces : torch.Tensor
        (F, 3) int64; orientation consistent over the mesh (its sign is
        fixed by the caller).
    """
    import torch
    from pytorch3d.ops.marching_cubes_data import FACE_TABLE

    dev = field.device
    X, Y, Z = field.shape
    below = field < level
    code = torch.zeros((X - 1, Y - 1, Z - 1), dtype=torch.int64, device=dev)
    for i, (dx, dy, dz) in enumerate(_CORNERS.tolist()):
        code |= below[dx:X - 1 + dx, dy:Y - 1 + dy, dz:Z - 1 + dz].long() << i
    active = (code != 0) & (code != 255)
    cells = torch.nonzero(active)  # (M, 3)
    cc = code[active]
    table = np.full((256, 15), -1, dtype=np.int64)
    for c, row in enumerate(FACE_TABLE):
        table[c, : len(row)] = row
    table_t = torch.from_numpy(table).to(dev)
    tri = table_t[cc].reshape(-1, 5, 3)  # (M, 5, 3) local edge ids
    valid = tri[:, :, 0] >= 0
    cell_of_tri = cells[:, None, :].expand(-1, 5, -1)[valid]  # (T, 3)
    tri = tri[valid]  # (T, 3)
    # a grid edge is (its lower corner, its axis); local edge -> that pair
    corners = torch.from_numpy(_CORNERS).to(dev)
    edges = torch.from_numpy(_EDGES).to(dev)
    a_off = corners[edges[:, 0]]
    b_off = corners[edges[:, 1]]
    low_off = torch.minimum(a_off, b_off)  # (12, 3)
    axis = torch.argmax((a_off - b_off).abs(), dim=1)  # (12,)
    base = cell_of_tri[:, None, :] + low_off[tri]  # (T, 3, 3) grid point
    gid = ((base[..., 0] * Y + base[..., 1]) * Z + base[..., 2]) * 3 + axis[tri]
    uniq, inverse = torch.unique(gid.reshape(-1), return_inverse=True)
    faces = inverse.reshape(-1, 3)
    ax = uniq % 3
    p = uniq // 3
    p0 = torch.stack([p // (Y * Z), (p // Z) % Y, p % Z], dim=1)
    unit = torch.nn.functional.one_hot(ax, 3)
    p1 = p0 + unit
    f0 = field[p0[:, 0], p0[:, 1], p0[:, 2]]
    f1 = field[p1[:, 0], p1[:, 1], p1[:, 2]]
    t = ((level - f0) / (f1 - f0)).clamp(0.0, 1.0)
    verts = p0.float() + unit.float() * t[:, None]
    return verts, faces


def _marching_cubes_np(field: np.ndarray, level: float):
    """scikit-image's Lewiner marching cubes.

    Not restricted with its ``mask=``: in scikit-image 0.26 a mask left
    holes in the surface even where it covered every crossing cube.
    """
    from skimage import measure

    verts, faces, _, _ = measure.marching_cubes(field, level, allow_degenerate=True)
    return verts.astype(np.float32), faces.astype(np.int64)


# --------------------------------------------------------------------------- mesh helpers
def _edges(faces: np.ndarray) -> np.ndarray:
    """(3F, 2) undirected edges, each sorted."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.sort(e, axis=1)


def mesh_topology(faces: np.ndarray, n_verts: "int | None" = None) -> dict:
    """Counts that tell whether a triangle mesh is a closed connected surface.

    Parameters
    ----------
    faces : numpy.ndarray
        (F, 3) int vertex indices.
    n_verts : int, optional
        Number of vertices (default: largest index + 1).

    Returns
    -------
    dict
        ``boundary_edges`` (edges used by 1 face), ``nonmanifold_edges`` (by
        more than 2), ``components`` (connected components of used vertices),
        ``euler`` (V - E + F; 2 for a sphere-like closed surface) and
        ``watertight`` (no boundary or non-manifold edge, one component).

    Examples
    --------
    >>> import numpy as np
    >>> tet = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    >>> mesh_topology(tet)["watertight"]
    True
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(faces, dtype=np.int64)
    n = int(faces.max()) + 1 if n_verts is None else int(n_verts)
    e = _edges(faces)
    key = e[:, 0] * n + e[:, 1]
    _, counts = np.unique(key, return_counts=True)
    used = np.unique(faces)
    adj = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, labels = connected_components(adj, directed=False)
    comps = int(np.unique(labels[used]).size)
    boundary = int((counts == 1).sum())
    nonmanifold = int((counts > 2).sum())
    return {
        "boundary_edges": boundary,
        "nonmanifold_edges": nonmanifold,
        "components": comps,
        "euler": int(used.size - counts.size + faces.shape[0]),
        "watertight": boundary == 0 and nonmanifold == 0 and comps == 1,
    }


def _largest_component(verts: np.ndarray, faces: np.ndarray):
    """Keep the connected piece of the mesh with the most faces; drop unused vertices."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = verts.shape[0]
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    adj = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    ncomp, labels = connected_components(adj, directed=False)
    if ncomp > 1:
        face_label = labels[faces[:, 0]]
        keep = face_label == np.argmax(np.bincount(face_label))
        faces = faces[keep]
    return _compact(verts, faces)


def _compact(verts: np.ndarray, faces: np.ndarray):
    """Drop vertices no face uses; renumber faces."""
    used = np.zeros(verts.shape[0], bool)
    used[faces.ravel()] = True
    if used.all():
        return verts, faces
    remap = np.cumsum(used) - 1
    return verts[used], remap[faces]


def _signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed mesh (mm^3): positive when faces are CCW from outside."""
    v = verts.astype(np.float64)
    c = v.mean(axis=0)
    a, b, d = v[faces[:, 0]] - c, v[faces[:, 1]] - c, v[faces[:, 2]] - c
    return float(np.einsum("ij,ij->i", a, np.cross(b, d)).sum() / 6.0)


def _outward(verts: np.ndarray, faces: np.ndarray) -> bool:
    """True when the winding of a closed, consistently wound mesh is CCW from outside.

    The faces around the vertex furthest along +x must face +x: a cheap test
    that needs no pass over the whole mesh.
    """
    i = int(np.argmax(verts[:, 0]))
    around = faces[np.flatnonzero(faces.ravel() == i) // 3]
    v = verts.astype(np.float64)
    fn = np.cross(v[around[:, 1]] - v[around[:, 0]], v[around[:, 2]] - v[around[:, 0]])
    return bool(fn[:, 0].sum() > 0)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals, (V, 3) float32, following the faces' winding."""
    v = verts.astype(np.float64)
    p0 = v[faces[:, 0]]
    fn = np.cross(v[faces[:, 1]] - p0, v[faces[:, 2]] - p0)
    # corner slot-major order: face f's three corners are f, F + f, 2F + f
    idx = np.ascontiguousarray(faces.T).ravel()
    n = np.empty((v.shape[0], 3))
    for c in range(3):
        n[:, c] = np.bincount(idx, weights=np.tile(fn[:, c], 3), minlength=v.shape[0])
    norm = np.sqrt(np.einsum("ij,ij->i", n, n))[:, None]
    n = np.where(norm > 0, n / np.maximum(norm, 1e-30), np.array([0.0, 0.0, 1.0]))
    return n.astype(np.float32)


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int = 10,
                  lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin lambda/mu smoothing: removes ripples without shrinking the surface.

    Parameters
    ----------
    verts : numpy.ndarray
        (V, 3) positions, mm.
    faces : numpy.ndarray
        (F, 3) indices.
    iterations : int
        Number of (lambda, mu) pass pairs.

    Returns
    -------
    numpy.ndarray
        (V, 3) float32 smoothed positions.
    """
    from scipy.sparse import coo_matrix, diags

    n = verts.shape[0]
    e = _edges(faces)
    e = np.unique(e, axis=0)
    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    deg = np.asarray(adj.sum(axis=1)).ravel()
    walk = diags(1.0 / np.maximum(deg, 1)) @ adj
    v = verts.astype(np.float64)
    for _ in range(int(iterations)):
        v = v + lam * (walk @ v - v)
        v = v + mu * (walk @ v - v)
    return v.astype(np.float32)


# --------------------------------------------------------------------------- face frame
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


# --------------------------------------------------------------------------- extraction
def _resolve_engine(engine: str, dev) -> str:
    if engine == "auto":
        return "torch" if dev.type == "cuda" else "numpy"
    if engine not in ("numpy", "torch"):
        raise SurfaceError(f"engine={engine!r} is not one of 'auto', 'numpy', 'torch'")
    if engine == "numpy" and dev.type != "cpu":
        raise SurfaceError(f"engine='numpy' runs on the CPU only, but device={dev} was asked for")
    return engine


def _iso_surface(field, level: float, engine: str):
    """Marching cubes on a work-grid field -> numpy (verts in padded work index units, faces)."""
    if engine == "torch":
        v, f = marching_cubes_torch(field, level)
        return v.cpu().numpy().astype(np.float32), f.cpu().numpy().astype(np.int64)
    return _marching_cubes_np(field, level)


def _decimated_field(field, factor: float, engine: str, lo_val: float):
    """The same (smoothed) field sampled every ``factor`` work voxels (cubic), re-padded with air.

    Coarse voxel j (after the new 1-voxel pad) sits at field index ``(j - 1) * factor``.
    """
    shape = tuple(int(np.floor((s - 1) / factor)) + 1 for s in field.shape)
    for ax in range(3):
        if engine == "torch":
            field = _resample_axis_torch(field, ax, 0.0, factor, shape[ax])
        else:
            field = _resample_axis_np(field, ax, 0.0, factor, shape[ax])
    if engine == "torch":
        import torch.nn.functional as F

        return F.pad(field[None, None], (1, 1, 1, 1, 1, 1), mode="constant", value=lo_val)[0, 0]
    return np.pad(field, 1, mode="constant", constant_values=lo_val)


def extract_head_surface(
    volume: Volume,
    *,
    device="auto",
    threshold: "float | None" = None,
    smooth_mm: float = 1.0,
    target_faces: "int | None" = None,
    voxel_mm: "float | None" = None,
    coarse_mm: float = 2.0,
    mesh_smooth_iters: int = 0,
    engine: str = "auto",
) -> HeadSurface:
    """Reconstruct the outer skin of a head scan as a closed triangle mesh.

    Steps (``docs/surface.md`` explains each default):

    1. Threshold: skin/air level from the scan's own histogram
       (:func:`estimate_threshold`) unless ``threshold`` is given.
    2. Head mask on a 2 mm block-averaged grid: largest object after an
       opening (drops noise, ghosting, head rests, markers), holes filled in
       3D and in every axial, coronal and sagittal slice (sinuses, airway,
       ear canals, mouth).
    3. Field: the scan cropped to the head, resampled to an isotropic grid
       (cubic, only where voxels are anisotropic), Gaussian-smoothed; the
       filled head's interior is raised above the level and the air far from
       the head lowered below it, so the only iso-surface left is the outer
       skin. Padded with air so that a head cut by the scan's edge closes.
    4. Marching cubes at sub-voxel precision on that intensity field
       (scikit-image's Lewiner algorithm on the CPU;
       :func:`marching_cubes_torch` with torch on CUDA), largest connected
       piece kept, winding made counter-clockwise from outside.
    5. Optional face budget (the field re-sampled coarser and the surface
       recomputed, so it stays closed), optional Taubin smoothing, vertex
       normals, and the face frame (:func:`estimate_face_frame`).

    Parameters
    ----------
    volume : Volume
        From :func:`mriface.load_volume`.
    device : str or torch.device
        ``"auto"`` = CUDA when present. On CUDA the voxel steps run in torch.
    threshold : float, optional
        Iso-level in the scan's units (MR: arbitrary; CT: HU, e.g. -400).
    smooth_mm : float
        Gaussian sigma (mm) of the intensity smoothing; 0 = none.
    target_faces : int, optional
        Upper bound on the number of faces.
    voxel_mm : float, optional
        Isotropic grid spacing (mm); default the scan's smallest voxel size.
    coarse_mm : float
        Block size (mm) of the segmentation grid.
    mesh_smooth_iters : int
        Taubin smoothing passes (0 = none).
    engine : {"auto", "numpy", "torch"}
        ``"auto"``: torch on CUDA, numpy/scikit-image on the CPU. ``"torch"``
        on the CPU runs the GPU code path there (tests compare the two).

    Returns
    -------
    HeadSurface
        verts (V, 3) float32 mm world RAS+; faces (F, 3) int64 CCW from
        outside; unit outward normals; face frame.

    Raises
    ------
    SurfaceError
        No head in the scan (no contrast, nothing big enough), or no surface.

    Examples
    --------
    >>> from mriface import load_volume, datasets
    >>> head = extract_head_surface(load_volume(datasets.fetch("voxface")))  # doctest: +SKIP
    >>> head.frame.forward.round(1)  # doctest: +SKIP
    array([0. , 1. , 0.1])
    """
    from ._device import resolve_device

    dev = resolve_device(device)
    eng = _resolve_engine(engine, dev)
    if smooth_mm < 0 or coarse_mm <= 0 or (voxel_mm is not None and voxel_mm <= 0):
        raise SurfaceError(
            f"smooth_mm={smooth_mm}, coarse_mm={coarse_mm}, voxel_mm={voxel_mm}: sizes must be positive"
        )
    if target_faces is not None and target_faces < 100:
        raise SurfaceError(f"target_faces={target_faces} is too small for a head: give at least 100")
    k = _block_factors(volume.zooms, coarse_mm)
    coarse = _block_mean(volume.data, k)
    est = estimate_threshold(volume, coarse_mm=coarse_mm, _coarse=(coarse, k))
    level = float(est.threshold if threshold is None else threshold)
    if threshold is not None and not (volume.data.min() < level < volume.data.max()):
        raise SurfaceError(
            f"{volume.name}: threshold={level:g} lies outside the scan's intensity range "
            f"[{volume.data.min():g}, {volume.data.max():g}]"
        )
    est = ThresholdEstimate(level, est.air, est.skin, est.contrast)
    masks = _head_masks(volume, est, coarse_mm, coarse)
    h = float(voxel_mm) if voxel_mm is not None else float(volume.zooms.min())
    grid = _work_grid(volume, masks, h)
    inner, outer = _fine_masks(masks, grid)
    lo_val, hi_val = _forced_levels(est, level)
    sigma = float(smooth_mm) / h
    if eng == "torch":
        field = _field_torch(volume, grid, sigma, inner, outer, lo_val, hi_val, dev)
    else:
        field = _field_np(volume, grid, sigma, inner, outer, lo_val, hi_val)
    del inner, outer
    verts, faces = _iso_surface(field, level, eng)
    scale = 1.0
    if target_faces is not None and faces.shape[0] > target_faces:
        # faces scale with the inverse square of the grid spacing
        for _ in range(3):
            scale *= float(np.sqrt(faces.shape[0] / target_faces)) * 1.02
            verts, faces = _iso_surface(_decimated_field(field, scale, eng, lo_val), level, eng)
            verts, faces = _largest_component(verts, faces)
            if faces.shape[0] <= target_faces:
                break
        verts = (verts - 1.0) * scale + 1.0  # back to the padded work grid
    if faces.shape[0] == 0:
        raise SurfaceError(f"{volume.name}: no surface at threshold {level:g}")
    verts, faces = _largest_component(verts, faces)
    # padded work index -> original voxel index -> world mm
    vox = grid.lo + (verts.astype(np.float64) - 1.0) * grid.step
    # einsum, not `@`: a BLAS call for an (N, 3) x (3, 3) product is ~8x
    # slower on a busy machine (thread start-up)
    world = np.einsum("ij,kj->ik", vox, volume.affine[:3, :3]) + volume.affine[:3, 3]
    if not _outward(world, faces):
        faces = faces[:, ::-1].copy()
    if mesh_smooth_iters > 0:
        world = taubin_smooth(world, faces, mesh_smooth_iters)
    world = world.astype(np.float32)
    normals = vertex_normals(world, faces)
    frame = estimate_face_frame(world, faces)
    return HeadSurface(verts=world, faces=np.ascontiguousarray(faces, dtype=np.int64), normals=normals, frame=frame)


# =========================================================================== mesh files
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


def _mesh_format(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".obj", "obj"), (".ply", "ply"), (".gii", "gifti")):
        if name.endswith(ext):
            return fmt
    with open(path, "rb") as fh:
        magic = fh.read(3)
    # FreeSurfer triangle surfaces (lh.seghead, lh.pial, ...) start with 0xFFFFFE
    if magic == b"\xff\xff\xfe":
        return "freesurfer"
    return "unknown"


def load_surface(path, *, seed: int = 0) -> HeadSurface:
    """Read a head surface made elsewhere and locate its face.

    Parameters
    ----------
    path : str or path-like
        A Wavefront ``.obj``, a ``.ply`` (ascii or binary), a GIfTI surface
        (``.gii``) or a FreeSurfer triangle surface (e.g. ``lh.seghead``, no
        extension). Coordinates are taken as millimetres in world RAS+.
        Polygons are split into triangles.
    seed : int
        Seed of the face-frame point sampling.

    Returns
    -------
    HeadSurface
        Unused vertices dropped, winding made counter-clockwise from outside
        (for a closed surface by its enclosed volume, else by pointing the
        normals away from the centroid), vertex normals, face frame from
        :func:`estimate_face_frame`.

    Raises
    ------
    InputFileError
        Missing, unknown format, or unreadable.
    SurfaceError
        No triangles, or no face could be located.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise InputFileError(f"{p}: no such file; check the path")
    fmt = _mesh_format(p)
    readers = {"obj": _read_obj, "ply": _read_ply, "gifti": _read_gifti, "freesurfer": _read_freesurfer}
    if fmt not in readers:
        raise InputFileError(
            f"{p}: unknown mesh format; give .obj, .ply, .gii or a FreeSurfer surface (e.g. lh.seghead)"
        )
    try:
        verts, faces = readers[fmt](p)
    except Exception as exc:  # malformed files raise anything from ValueError to IndexError
        raise InputFileError(f"{p}: could not read it as {fmt} ({type(exc).__name__}: {exc})") from exc
    if verts is None or faces is None or len(faces) == 0 or len(verts) < 4:
        raise SurfaceError(f"{p}: the mesh has no triangles")
    if faces.min() < 0 or faces.max() >= len(verts) or not np.all(np.isfinite(verts)):
        raise InputFileError(f"{p}: face indices point outside the vertex list, or coordinates are not finite")
    verts, faces = _compact(verts, faces)
    topo = mesh_topology(faces, len(verts))
    if topo["boundary_edges"] == 0 and topo["nonmanifold_edges"] == 0:
        flip = _signed_volume(verts, faces) < 0
    else:
        # open surface (e.g. a 3D face scan): normals should point away from the centroid
        fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
        flip = float(np.einsum("ij,ij->", fn, verts[faces].mean(axis=1) - verts.mean(axis=0))) < 0
    if flip:
        faces = faces[:, ::-1].copy()
    verts32 = verts.astype(np.float32)
    try:
        frame = estimate_face_frame(verts32, faces, seed=seed)
    except SurfaceError as exc:
        raise SurfaceError(f"{p}: {exc}") from exc
    return HeadSurface(verts32, np.ascontiguousarray(faces, np.int64), vertex_normals(verts32, faces), frame)


def save_surface(surface: HeadSurface, path) -> Path:
    """Write a surface as binary little-endian ``.ply`` (with normals) or ``.obj``, atomically.

    The face frame is not stored (``load_surface`` re-estimates it); use
    :func:`save_surface_npz` to cache a surface with its frame.

    Returns
    -------
    pathlib.Path
    """
    from ._io import atomic_path

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
