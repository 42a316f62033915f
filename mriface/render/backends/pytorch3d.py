"""pytorch3d's ``MeshRasterizer``, batched over views and meshes.

No longer the default on CUDA (the ``zbuffer`` backend is many times faster on
dense heads: pytorch3d's fine stage loops over every face of a 32x32-pixel bin);
kept for soft silhouettes and for users who extend pytorch3d.

The cameras are handed over unchanged (``FoVPerspectiveCameras`` with the
same R, T and field of view): mriface's camera convention *is* pytorch3d's,
so the projection and pixel centres match the embree backend exactly.
Barycentrics are perspective-correct; pytorch3d's backward pass carries
gradients from them and from the depth to the vertex positions.
"""

from __future__ import annotations

import math

import torch

from ...errors import BackendError
from ..cameras import Cameras
from ..fragments import Fragments, Hits, fragments_to_hits
from .base import Scene

__all__ = ["Pytorch3DBackend", "soft_silhouette", "to_pytorch3d_cameras", "default_bin_size", "images_per_call",
           "BIN_BUFFER_BYTES"]


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


#: bytes of pytorch3d's coarse-rasterizer bin buffer (int32 per slot) allowed per call
BIN_BUFFER_BYTES = 2 << 30


def default_bin_size(image_size: int, device: torch.device) -> int:
    """The bin size pytorch3d picks for ``bin_size=None`` (0: naive rasterizer, always on the CPU)."""
    if torch.device(device).type != "cuda":
        return 0
    if image_size <= 64:
        return 8
    return int(2 ** max(math.ceil(math.log2(image_size)) - 4, 4))


def images_per_call(image_size: int, bin_size: int, max_faces_per_bin: int, budget_bytes: int = BIN_BUFFER_BYTES) -> int:
    """How many images one pytorch3d call may hold so that its bin buffer stays within ``budget_bytes``.

    The coarse rasterizer allocates images x bins x ``max_faces_per_bin`` int32
    slots, bins = ceil(S / bin_size)^2. The naive rasterizer (``bin_size=0``)
    has no such buffer: no limit.
    """
    if bin_size == 0:
        return 1 << 62
    bins = (-(-image_size // bin_size)) ** 2
    return max(1, budget_bytes // (bins * max_faces_per_bin * 4))


class Pytorch3DBackend:
    """pytorch3d's ``MeshRasterizer`` (hard, one face per pixel); CPU or CUDA, several meshes per call.

    Options of :meth:`hits`: ``bin_size``, ``max_faces_per_bin``.
    """

    name = "pytorch3d"
    default_device = "auto"
    batches_meshes = True

    def hits(self, scene: Scene, *, bin_size: "int | None" = None, max_faces_per_bin: "int | None" = None) -> Hits:
        """The covered pixels of :func:`dense_fragments` (differentiable through pytorch3d's backward)."""
        return fragments_to_hits(dense_fragments(scene, bin_size=bin_size, max_faces_per_bin=max_faces_per_bin))


def dense_fragments(scene: Scene, *, bin_size: "int | None" = None, max_faces_per_bin: "int | None" = None) -> Fragments:
    """pytorch3d's full-size fragments of ``scene``, face ids into ``scene.joined``.

    ``bin_size`` / ``max_faces_per_bin`` go to ``RasterizationSettings``
    (``bin_size=None``: pytorch3d's heuristic; ``bin_size=0`` is the naive
    rasterizer). On CUDA pytorch3d reports a bin overflow only with a C++
    printf and silently drops triangles, which Python cannot detect; so by
    default ``max_faces_per_bin`` is the largest mesh's face count (no bin can
    overflow) and the images are split into calls whose bin buffer stays
    within :data:`BIN_BUFFER_BYTES`. A smaller ``max_faces_per_bin`` is the
    caller's risk on CUDA; on the CPU (naive only) an overflow raises BackendError.
    """
    verts_list, faces_list, mesh_index, cameras = scene.verts_list, scene.faces_list, scene.mesh_index, scene.cameras
    image_size = scene.image_size
    _, MeshRasterizer, RasterizationSettings, _ = _import()
    n_max = max(int(f.shape[0]) for f in faces_list)
    if max_faces_per_bin is None:
        max_faces_per_bin = max(1, n_max)
    dev = cameras.device
    eff_bin = default_bin_size(image_size, dev) if bin_size is None else int(bin_size)
    group = images_per_call(image_size, eff_bin, max_faces_per_bin)
    sizes = torch.tensor([int(f.shape[0]) for f in faces_list], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    settings = RasterizationSettings(
        image_size=image_size, blur_radius=0.0, faces_per_pixel=1, bin_size=bin_size,
        max_faces_per_bin=max_faces_per_bin, perspective_correct=True, cull_backfaces=False,
    )
    parts = []
    for a in range(0, len(cameras), group):
        idx = mesh_index[a:a + group]
        meshes = _meshes(verts_list, faces_list, idx)
        try:
            frags = MeshRasterizer(cameras=to_pytorch3d_cameras(cameras[a:a + group]), raster_settings=settings)(meshes)
        except RuntimeError as exc:  # the CPU coarse rasterizer raises on overflow
            if "too many faces per bin" not in str(exc):
                raise
            raise BackendError(
                f"pytorch3d's coarse rasterizer overflowed its bins (max_faces_per_bin={max_faces_per_bin}): "
                "leave max_faces_per_bin=None (room for a whole mesh), or pass bin_size=0 for the naive rasterizer"
            ) from exc
        p2f = frags.pix_to_face[..., 0]
        # packed face index of view n -> row in concat_meshes(verts_list, faces_list)
        first = meshes.mesh_to_faces_packed_first_idx()
        shift = (offsets.to(p2f.device)[idx.to(p2f.device)] - first)[:, None, None]
        hit = p2f >= 0
        parts.append((torch.where(hit, p2f + shift, p2f), torch.where(hit[..., None], frags.bary_coords[..., 0, :], 0.0),
                      torch.where(hit, frags.zbuf[..., 0], -1.0)))
    if len(parts) == 1:
        return Fragments(*parts[0])
    return Fragments(*(torch.cat([p[k] for p in parts]) for k in range(3)))


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
    verts, faces : one mesh (V, 3), (F, 3) or lists with ``mesh_index`` (see :func:`~mriface.render.rasterize`).
    cameras : N cameras; image_size : S pixels.
    sigma : sharpness, squared NDC units.

    Returns
    -------
    torch.Tensor
        (N, S, S) in [0, 1], differentiable w.r.t. ``verts``.
    """
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
