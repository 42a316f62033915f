"""pytorch3d's ``MeshRasterizer``: the default CUDA backend, batched over views and meshes.

The cameras are handed over unchanged (``FoVPerspectiveCameras`` with the
same R, T and field of view): mriface's camera convention *is* pytorch3d's,
so the projection and pixel centres match the embree backend exactly.
Barycentrics are perspective-correct; pytorch3d's backward pass carries
gradients from them and from the depth to the vertex positions.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..errors import BackendError
from .cameras import Cameras
from .rasterize import Fragments

__all__ = ["rasterize_pytorch3d", "soft_silhouette", "to_pytorch3d_cameras"]


def _import():
    try:
        from pytorch3d.renderer import FoVPerspectiveCameras, MeshRasterizer, RasterizationSettings
        from pytorch3d.structures import Meshes
    except ImportError as exc:
        raise BackendError(
            "backend='pytorch3d' needs pytorch3d (the 'easypytorch3d' distribution, built for torch 2.11/2.12): "
            f"install it or use backend='embree' ({exc})"
        ) from exc
    return FoVPerspectiveCameras, MeshRasterizer, RasterizationSettings, Meshes


def to_pytorch3d_cameras(cameras: Cameras):
    """The same cameras as a ``pytorch3d.renderer.FoVPerspectiveCameras``."""
    FoVPerspectiveCameras = _import()[0]
    return FoVPerspectiveCameras(
        znear=cameras.znear, zfar=cameras.zfar, aspect_ratio=1.0, fov=cameras.fov_deg,
        degrees=True, R=cameras.R, T=cameras.T, device=cameras.device,
    )


def _meshes(verts_list, faces_list, mesh_index):
    Meshes = _import()[3]
    idx = mesh_index.tolist()
    return Meshes(verts=[verts_list[m] for m in idx], faces=[faces_list[m] for m in idx])


def rasterize_pytorch3d(
    verts_list: Sequence[torch.Tensor],
    faces_list: Sequence[torch.Tensor],
    mesh_index: torch.Tensor,
    cameras: Cameras,
    image_size: int,
    *,
    bin_size: "int | None" = None,
    max_faces_per_bin: "int | None" = None,
) -> Fragments:
    """pytorch3d implementation of :func:`mriface.render.rasterize` (hard, one face per pixel).

    ``bin_size`` / ``max_faces_per_bin`` go to ``RasterizationSettings``
    (None: pytorch3d's heuristics; ``bin_size=0`` is the naive rasterizer).
    """
    _, MeshRasterizer, RasterizationSettings, _ = _import()
    meshes = _meshes(verts_list, faces_list, mesh_index)
    n_max = max(int(f.shape[0]) for f in faces_list)
    if max_faces_per_bin is None:
        # a face fills the middle bins: allow a bin to hold a large share of a mesh
        max_faces_per_bin = max(10000, n_max // 4)
    p3d_cams = to_pytorch3d_cameras(cameras)

    def run(per_bin):
        settings = RasterizationSettings(
            image_size=image_size, blur_radius=0.0, faces_per_pixel=1, bin_size=bin_size,
            max_faces_per_bin=per_bin, perspective_correct=True, cull_backfaces=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = MeshRasterizer(cameras=p3d_cams, raster_settings=settings)(meshes)
            except RuntimeError as exc:  # the CPU coarse rasterizer raises where CUDA warns
                if "too many faces per bin" not in str(exc):
                    raise
                return None, True
        overflow = False
        for w in caught:
            if "Bin size was too small" in str(w.message):
                overflow = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, overflow

    frags, overflow = run(max_faces_per_bin)
    if overflow and max_faces_per_bin < n_max:
        # a bin held more faces than allowed and pytorch3d dropped some: redo with room for a whole mesh
        frags, overflow = run(n_max)
    if frags is None:
        raise BackendError(
            f"pytorch3d's coarse rasterizer overflowed its bins (max_faces_per_bin={max_faces_per_bin}): "
            "pass a larger max_faces_per_bin, or bin_size=0 for the naive rasterizer"
        )
    if overflow:
        warnings.warn("pytorch3d's coarse rasterizer overflowed its bins; some triangles may be missing. "
                      "Pass bin_size=0 (naive rasterizer) to rasterize() to avoid it.", RuntimeWarning, stacklevel=2)
    p2f = frags.pix_to_face[..., 0]
    # packed face index of view n -> row in concat_meshes(verts_list, faces_list)
    first = meshes.mesh_to_faces_packed_first_idx()
    sizes = torch.tensor([int(f.shape[0]) for f in faces_list], device=p2f.device)
    offset = (torch.cumsum(sizes, 0) - sizes)[mesh_index.to(p2f.device)]
    shift = (offset - first)[:, None, None]
    hit = p2f >= 0
    p2f = torch.where(hit, p2f + shift, p2f)
    bary = torch.where(hit[..., None], frags.bary_coords[..., 0, :], 0.0)
    depth = torch.where(hit, frags.zbuf[..., 0], -1.0)
    return Fragments(p2f, bary, depth)


def soft_silhouette(
    verts,
    faces,
    cameras: Cameras,
    image_size: int,
    *,
    sigma: float = 1e-4,
    faces_per_pixel: int = 20,
    mesh_index=None,
) -> torch.Tensor:
    """Differentiable soft silhouette (SoftRas-style) for silhouette gradients.

    Each of the ``faces_per_pixel`` nearest faces within a blur radius
    contributes ``sigmoid(-d / sigma)`` (``d``: pytorch3d's signed squared
    NDC distance from the pixel to the face edge, negative inside); the
    silhouette is ``1 - prod(1 - p)``.

    Parameters
    ----------
    verts, faces : one mesh (V, 3), (F, 3) or lists with ``mesh_index`` (see :func:`rasterize`).
    cameras : N cameras; image_size : S pixels.
    sigma : sharpness, squared NDC units.

    Returns
    -------
    torch.Tensor
        (N, S, S) in [0, 1], differentiable w.r.t. ``verts``.
    """
    import math

    _, MeshRasterizer, RasterizationSettings, _ = _import()
    if isinstance(verts, torch.Tensor):
        verts, faces = [verts], [faces]
        mesh_index = torch.zeros(len(cameras), dtype=torch.int64)
    mesh_index = torch.as_tensor(mesh_index, dtype=torch.int64).cpu()
    meshes = _meshes(list(verts), [torch.as_tensor(f, device=verts[0].device) for f in faces], mesh_index)
    settings = RasterizationSettings(
        image_size=image_size, blur_radius=math.log(1.0 / 1e-4 - 1.0) * sigma,
        faces_per_pixel=faces_per_pixel, perspective_correct=False,
    )
    frags = MeshRasterizer(cameras=to_pytorch3d_cameras(cameras), raster_settings=settings)(meshes)
    prob = torch.sigmoid(-frags.dists / sigma) * (frags.pix_to_face >= 0)
    return 1.0 - torch.prod(1.0 - prob, dim=-1)
