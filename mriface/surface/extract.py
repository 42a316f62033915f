"""Volume -> HeadSurface: :func:`extract_head_surface`, the steps of ``docs/surface.md`` in order."""

from __future__ import annotations

import numpy as np

from ..errors import SurfaceError
from ..volume import Volume
from .field import (
    _field_np,
    _field_torch,
    _fine_masks,
    _forced_levels,
    _resample_axis_np,
    _resample_axis_torch,
    _work_grid,
)
from .frame import estimate_face_frame
from .headrest import rest_cap
from .marching import _marching_cubes_np, marching_cubes_torch
from .masks import ThresholdEstimate, _block_factors, _block_mean, _head_masks, estimate_threshold
from .mesh import _largest_component, _outward, taubin_smooth, vertex_normals_np
from .types import HeadSurface

__all__ = ["extract_head_surface"]


def _resolve_engine(engine: str, dev) -> str:
    if engine == "auto":
        return "torch" if dev.type == "cuda" else "numpy"
    if engine not in ("numpy", "torch"):
        raise SurfaceError(f"engine={engine!r} is not one of 'auto', 'numpy', 'torch'")
    if engine == "numpy" and dev.type != "cpu":
        raise SurfaceError(f"engine='numpy' runs on the CPU only, but device={dev} was asked for")
    return engine


def _iso_surface(field, level: float, engine: str):
    """Marching cubes on a work-grid field -> (verts in padded work index units, faces).

    numpy arrays for the numpy engine; tensors on the field's device for torch.
    """
    if engine == "torch":
        return marching_cubes_torch(field, level)
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


def _cap_rest(field, masks, grid, level: float, span: float, h: float, engine: str) -> None:
    """Cut a head rest found on the coarse mask out of the (padded) field, in place (headrest.py)."""
    got = rest_cap(masks.rest, masks.k, grid, level, 0.5 * span, h)
    if got is None:
        return
    sls, cap, where, material = got
    # the field carries a 1-voxel pad
    sls = tuple(slice(s.start + 1, s.stop + 1) for s in sls)
    if material is not None:
        mwhere, mid, gain = material
    if engine == "torch":
        import torch

        cap_t = torch.from_numpy(np.where(where, cap, np.float32(np.inf))).to(field.device)
        box = torch.minimum(field[sls], cap_t)
        if material is not None:
            m_t = torch.from_numpy(mwhere).to(field.device)
            box = torch.where(m_t, torch.minimum(box, level - gain * (box - mid)), box)
        field[sls] = box
    else:
        box = field[sls]
        np.minimum(box, cap, out=box, where=where)
        if material is not None:
            mcap = (np.float32(level) - np.float32(gain) * (box - np.float32(mid))).astype(np.float32)
            np.minimum(box, mcap, out=box, where=mwhere)


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
    from .._device import resolve_device

    dev = resolve_device(device)
    eng = _resolve_engine(engine, dev)
    if smooth_mm < 0 or coarse_mm <= 0 or (voxel_mm is not None and voxel_mm <= 0):
        raise SurfaceError(
            f"smooth_mm={smooth_mm}, coarse_mm={coarse_mm}, voxel_mm={voxel_mm}: sizes must be positive"
        )
    if target_faces is not None and target_faces < 100:
        raise SurfaceError(f"target_faces={target_faces} is too small for a head: give at least 100")
    k = _block_factors(volume.zooms, coarse_mm)
    data_t = None
    if eng == "torch":
        # the volume goes to the device once; masks, field and mesh are made there
        import torch

        from .masks_torch import _block_mean_torch, estimate_threshold_torch

        data_t = torch.as_tensor(np.ascontiguousarray(volume.data, dtype=np.float32)).to(dev)
        coarse = _block_mean_torch(data_t, k)
        est = estimate_threshold_torch(volume, coarse, k, coarse_mm, data=data_t)
    else:
        coarse = _block_mean(volume.data, k)
        est = estimate_threshold(volume, coarse_mm=coarse_mm, _coarse=(coarse, k))
    level = float(est.threshold if threshold is None else threshold)
    if threshold is not None and not (volume.data.min() < level < volume.data.max()):
        raise SurfaceError(
            f"{volume.name}: threshold={level:g} lies outside the scan's intensity range "
            f"[{volume.data.min():g}, {volume.data.max():g}]"
        )
    est = ThresholdEstimate(level, est.air, est.skin, est.contrast)
    if eng == "torch":
        from .masks_torch import _head_masks_torch

        masks = _head_masks_torch(volume, est, coarse_mm, coarse)
    else:
        masks = _head_masks(volume, est, coarse_mm, coarse)
    h = float(voxel_mm) if voxel_mm is not None else float(volume.zooms.min())
    grid = _work_grid(volume, masks, h)
    inner, outer = _fine_masks(masks, grid)
    lo_val, hi_val = _forced_levels(est, level)
    sigma = float(smooth_mm) / h
    if eng == "torch":
        field = _field_torch(volume, grid, sigma, inner, outer, lo_val, hi_val, dev, data=data_t)
        del data_t
    else:
        field = _field_np(volume, grid, sigma, inner, outer, lo_val, hi_val)
    del inner, outer
    if masks.rest is not None:
        _cap_rest(field, masks, grid, level, hi_val - lo_val, h, eng)
    if eng == "torch":
        # the mesh stays on the device until the frame is found (mesh_torch.py, frame_torch.py)
        from .mesh_torch import _largest_component_torch as largest
    else:
        largest = _largest_component
    verts, faces = _iso_surface(field, level, eng)
    scale = 1.0
    if target_faces is not None and faces.shape[0] > target_faces:
        # faces scale with the inverse square of the grid spacing
        for _ in range(3):
            scale *= float(np.sqrt(faces.shape[0] / target_faces)) * 1.02
            verts, faces = _iso_surface(_decimated_field(field, scale, eng, lo_val), level, eng)
            verts, faces = largest(verts, faces)
            if faces.shape[0] <= target_faces:
                break
        verts = (verts - 1.0) * scale + 1.0  # back to the padded work grid
    if faces.shape[0] == 0:
        raise SurfaceError(f"{volume.name}: no surface at threshold {level:g}")
    verts, faces = largest(verts, faces)
    if eng == "torch":
        return _finish_torch(verts, faces, grid, volume, mesh_smooth_iters)
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
    normals = vertex_normals_np(world, faces)
    frame = estimate_face_frame(world, faces)
    return HeadSurface(verts=world, faces=np.ascontiguousarray(faces, dtype=np.int64), normals=normals, frame=frame)


def _finish_torch(verts, faces, grid, volume: Volume, mesh_smooth_iters: int) -> HeadSurface:
    """The torch engine's last steps on the device: world mm, winding, normals, frame; then the mesh comes out.

    ``verts`` (V, 3) float32 padded work indices and ``faces`` (F, 3) int64 of the
    largest piece, tensors on the field's device. Taubin smoothing (off by
    default) is the one step that runs on the host (a round trip of the mesh).
    """
    import torch

    from .frame_torch import estimate_face_frame_torch
    from .mesh_torch import _outward_torch, vertex_normals_torch_f64

    dev = verts.device
    f64 = {"dtype": torch.float64, "device": dev}
    vox = torch.as_tensor(grid.lo, **f64) + (verts.double() - 1.0) * torch.as_tensor(grid.step, **f64)
    world = vox @ torch.as_tensor(volume.affine[:3, :3], **f64).T + torch.as_tensor(volume.affine[:3, 3], **f64)
    if not _outward_torch(world, faces):
        faces = faces.flip(1).contiguous()
    if mesh_smooth_iters > 0:
        smoothed = taubin_smooth(world.cpu().numpy(), faces.cpu().numpy(), mesh_smooth_iters)
        world = torch.from_numpy(smoothed).to(dev)
    world = world.float()
    normals = vertex_normals_torch_f64(world, faces)
    frame = estimate_face_frame_torch(world, faces)
    return HeadSurface(verts=world.cpu().numpy(), faces=np.ascontiguousarray(faces.cpu().numpy(), dtype=np.int64),
                       normals=normals.cpu().numpy(), frame=frame)
