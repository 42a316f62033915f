"""Mesh and ray geometry shared by the backends, in torch.

Joining meshes (:func:`concat_meshes`), keeping the triangles some camera can
see (:func:`front_faces`), the ray through a pixel centre (:func:`pixel_rays`)
and ray-triangle intersection against known triangles
(:func:`ray_triangle_hits`, differentiable: the gradient path of the zbuffer
and embree backends).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .cameras import Cameras

__all__ = ["concat_meshes", "front_faces", "ray_triangle_hits", "pixel_rays", "split_pixels"]


def concat_meshes(verts: Sequence[torch.Tensor], faces: Sequence[torch.Tensor]):
    """Join meshes into one vertex and one face array (face indices offset).

    Returns
    -------
    verts : torch.Tensor
        (sum V_m, 3).
    faces : torch.Tensor
        (sum F_m, 3) int64 indices into the joined ``verts``.
    face_offset : torch.Tensor
        (M,) int64 first row of mesh ``m`` in the joined ``faces``.
    """
    v_off = 0
    out_f = []
    for v, f in zip(verts, faces):
        out_f.append(torch.as_tensor(f, dtype=torch.int64, device=v.device) + v_off)
        v_off += int(v.shape[0])
    sizes = torch.tensor([int(f.shape[0]) for f in faces], dtype=torch.int64)
    face_offset = torch.cumsum(sizes, 0) - sizes
    return torch.cat(list(verts), 0), torch.cat(out_f, 0), face_offset


def front_faces(verts: torch.Tensor, faces: torch.Tensor, eyes: torch.Tensor) -> torch.Tensor:
    """Indices of the triangles that face at least one of the camera positions ``eyes``.

    For a closed, outward-oriented surface (a HeadSurface) a ray from outside
    always meets a triangle facing it first, so rendering only these
    triangles gives exactly the same image for those cameras; for a head
    seen from the front it drops about half the mesh. Triangles within about
    half a degree of edge-on are kept.

    Parameters
    ----------
    verts : (V, 3) world mm; faces : (F, 3) int64; eyes : (K, 3) camera centres, mm.

    Returns
    -------
    torch.Tensor
        (F',) int64 rows of ``faces``, on ``faces``' device.
    """
    v = verts.detach()
    origin = v.mean(dim=0)
    v = v - origin
    # index_select, not advanced indexing: several times faster on the CPU
    a, b, c = (v.index_select(0, faces[:, k]) for k in range(3))
    fn = torch.linalg.cross(b - a, c - a)
    e = eyes.detach().to(v.dtype) - origin
    # fn . (eye - a) for every eye at once; tolerance |fn| * distance * sin(0.5 deg)
    side = (fn @ e.T).amax(dim=1) - (fn * a).sum(1)
    scale = 0.01 * float(e.norm(dim=1).max() + a.abs().max())
    return torch.nonzero(side > -scale * fn.norm(dim=1)).flatten()


def ray_triangle_hits(verts: torch.Tensor, faces: torch.Tensor, face_id: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor):
    """Barycentrics and ray parameter of rays against known triangles (Moller-Trumbore), in torch.

    Differentiable with respect to ``verts`` (and the rays).

    Parameters
    ----------
    verts : (V, 3) world mm; faces : (F, 3) int64; face_id : (R,) int64 rows of ``faces``;
    origins, dirs : (R, 3) ray origins (mm) and directions.

    Returns
    -------
    bary : (R, 3) weights of the triangle's vertices 0, 1, 2.
    t : (R,) ray parameter of the hit (``origin + t * dir``).
    """
    tri = verts[faces[face_id]]  # (R,3,3)
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2 = v1 - v0, v2 - v0
    p = torch.cross(dirs, e2, dim=-1)
    det = (e1 * p).sum(-1)
    inv = 1.0 / det
    s = origins - v0
    u = (s * p).sum(-1) * inv
    q = torch.cross(s, e1, dim=-1)
    v = (dirs * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    return torch.stack([1 - u - v, u, v], dim=-1), t


def split_pixels(pixel: torch.Tensor, image_size: int):
    """(view, row, col) int64 tensors of flat pixel indices ``view * S * S + row * S + col``."""
    s = int(image_size)
    view = torch.div(pixel, s * s, rounding_mode="floor")
    rem = pixel - view * (s * s)
    row = torch.div(rem, s, rounding_mode="floor")
    return view, row, rem - row * s


def pixel_rays(cameras: Cameras, image_size: int, view: torch.Tensor, row: torch.Tensor, col: torch.Tensor, dtype):
    """World origin and direction of the ray through each given pixel centre, in ``dtype``.

    The direction has camera-space z = 1, so a hit's ray parameter is its
    depth ``z_cam`` in mm (see :mod:`mriface.render.cameras` for the pixel centres).

    Returns
    -------
    origins, dirs : (M, 3) each.
    """
    s = image_size
    th = cameras.tan_half_fov().to(dtype)[view]
    x = (1 - (2 * col.to(dtype) + 1) / s) * th
    y = (1 - (2 * row.to(dtype) + 1) / s) * th
    R = cameras.R.to(dtype)[view]  # (M, 3, 3): columns are the camera axes in world
    d = x[:, None] * R[:, :, 0] + y[:, None] * R[:, :, 1] + R[:, :, 2]
    origins = cameras.centers().to(dtype)[view]
    return origins, d
