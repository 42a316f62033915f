"""The isotropic working grid and the smoothed, forced intensity field on it (numpy and torch twins).

Step 4 of :func:`~mriface.surface.extract_head_surface` (``docs/surface.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..volume import Volume
from .masks import ThresholdEstimate, _HeadMasks

__all__: "list[str]" = []


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
    from ._threads import in_slabs

    pos = start + step * np.arange(n, dtype=np.float64)
    i0 = np.floor(pos).astype(np.int64)
    t = (pos - i0).astype(np.float32)
    last = a.shape[axis] - 1
    shape = [1, 1, 1]
    shape[axis] = n
    taps = [(np.clip(i0 + off, 0, last), w.reshape(shape))
            for off, w in zip((-1, 0, 1, 2), _catmull_rom_weights(t))]
    out = np.empty(a.shape[:axis] + (n,) + a.shape[axis + 1:], np.float32)
    k = 1 if axis == 0 else 0  # slabs along another axis: each is resampled on its own

    def slab(sl: slice) -> None:
        idx = (slice(None),) * k + (sl,)
        src, dst = a[idx], out[idx]
        # one scratch array for the four taps: fresh full-size temporaries cost
        # as much in page faults as the arithmetic
        buf = np.empty(dst.shape, np.float32)
        for j, (cols, w) in enumerate(taps):
            np.take(src, cols, axis=axis, out=buf)
            buf *= w
            if j:
                dst += buf
            else:
                dst[...] = buf

    in_slabs(slab, a.shape[k])
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
    if isinstance(near, np.ndarray):
        idx = [np.flatnonzero(near.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    else:  # a tensor (engine="torch"): only the box's six numbers come back
        from .masks_torch import _box

        idx = [np.array([b.start, b.stop - 1]) for b in _box(near, 0)]
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
    if not isinstance(masks.interior, np.ndarray):  # tensors (engine="torch"): gathered on their device
        import torch

        idx_t = [torch.from_numpy(i).to(masks.interior.device) for i in idx]
        out = []
        for m in (masks.interior, masks.exterior):
            for ax in range(3):
                m = torch.index_select(m, ax, idx_t[ax])
            out.append(m)
        return out[0], out[1]
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


def _correlate1d(a: np.ndarray, w: np.ndarray, axis: int, output: np.ndarray) -> None:
    """``scipy.ndimage.correlate1d(a, w, axis, output, mode="nearest")`` in slabs along another axis, threaded.

    Each line along ``axis`` is filtered on its own, so the slabs give the
    same bits as one call; ``a`` and ``output`` must not overlap.
    """
    from scipy import ndimage as ndi

    from ._threads import in_slabs

    k = 1 if axis == 0 else 0

    def slab(sl: slice) -> None:
        idx = (slice(None),) * k + (sl,)
        ndi.correlate1d(a[idx], w, axis=axis, output=output[idx], mode="nearest")

    in_slabs(slab, a.shape[k])


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
        # (a resampled copy is free to overwrite once read)
        tmp = a if owned else np.empty(a.shape, np.float32)
        _correlate1d(a, w, 0, inner_view)
        _correlate1d(inner_view, w, 1, tmp)
        _correlate1d(tmp, w, 2, inner_view)
    else:
        inner_view[...] = a
    np.maximum(inner_view, np.float32(hi_val), out=inner_view, where=inner)
    np.minimum(inner_view, np.float32(lo_val), out=inner_view, where=outer)
    # the 1-voxel frame of lo_val is a margin of air: a head cut by the
    # scan's edge still closes
    return out


def _field_torch(volume: Volume, grid: _Grid, sigma_vox: float, inner, outer, lo_val, hi_val, device,
                 data=None):
    """Torch twin of :func:`_field_np`; returns a float32 tensor on ``device``.

    ``data``: the volume already on ``device`` (float32), else it is copied there;
    ``inner``/``outer``: numpy arrays or tensors on ``device``.
    """
    import torch
    import torch.nn.functional as F

    a = data if data is not None else torch.as_tensor(np.ascontiguousarray(volume.data, dtype=np.float32)).to(device)
    for ax in range(3):
        if abs(grid.step[ax] - 1.0) < 1e-9 and float(grid.lo[ax]).is_integer():
            a = a.narrow(ax, int(grid.lo[ax]), grid.shape[ax])
        else:
            a = _resample_axis_torch(a, ax, float(grid.lo[ax]), float(grid.step[ax]), grid.shape[ax])
    a = _smooth_torch(a.contiguous(), sigma_vox)
    inner_t = torch.as_tensor(inner).to(device)
    outer_t = torch.as_tensor(outer).to(device)
    a = torch.where(inner_t, torch.clamp(a, min=hi_val), a)
    a = torch.where(outer_t, torch.clamp(a, max=lo_val), a)
    return F.pad(a[None, None], (1, 1, 1, 1, 1, 1), mode="constant", value=lo_val)[0, 0]
