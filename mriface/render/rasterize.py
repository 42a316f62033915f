"""The seam between backends and the shader: :class:`Fragments` and :func:`rasterize`.

A backend answers one question per pixel: which triangle is visible there
(``-1`` for background), where inside it (barycentric weights) and how far
from the camera (depth ``z_cam``, mm). Everything else (normals, lighting,
colour) is the shader's job, written once in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import BackendError
from .cameras import Cameras

__all__ = ["Fragments", "rasterize", "resolve_backend", "concat_meshes", "front_faces", "ray_triangle_hits", "BACKENDS"]

#: every backend name :func:`rasterize` accepts besides ``"auto"``
BACKENDS = ("zbuffer", "pytorch3d", "embree")


@dataclass(frozen=True, eq=False)
class Fragments:
    """What each pixel sees.

    Attributes
    ----------
    pix_to_face : torch.Tensor
        (N, S, S) int64 row index into the ``faces`` given to :func:`rasterize`
        (into the concatenated faces when a list of meshes was given), ``-1``
        where the ray misses every triangle.
    bary : torch.Tensor
        (N, S, S, 3) barycentric weights of the visible point with respect to
        the triangle's three vertices (perspective-correct; zero on background).
    depth : torch.Tensor
        (N, S, S) camera-space depth ``z_cam`` of the visible point, mm;
        ``-1`` on background.
    """

    pix_to_face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(N, S, S) bool coverage: True where a triangle is visible."""
        return self.pix_to_face >= 0

    @property
    def image_size(self) -> int:
        return int(self.pix_to_face.shape[-1])


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"zbuffer"`` on CUDA, ``"embree"`` on the CPU; checks names.

    Raises
    ------
    BackendError
        For an unknown name, or embree asked for on a CUDA device.
    """
    if backend == "auto":
        return "zbuffer" if device.type == "cuda" else "embree"
    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r} is not a renderer backend: use 'auto', 'zbuffer', 'pytorch3d' or 'embree'")
    return backend


def _device_for(backend: str, device) -> torch.device:
    """The compute device: 'auto' means the CPU for embree (it has no GPU path), else CUDA when present."""
    from .._device import resolve_device

    if backend == "embree" and (device is None or device == "auto"):
        return torch.device("cpu")
    return resolve_device(device)


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
    """Barycentrics and ray parameter of rays against known triangles, in torch.

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


def rasterize(
    verts,
    faces,
    cameras: Cameras,
    image_size: int,
    *,
    backend: str = "auto",
    mesh_index=None,
    device="auto",
    **backend_options,
) -> Fragments:
    """Find the visible triangle, barycentrics and depth at every pixel centre.

    Parameters
    ----------
    verts : torch.Tensor or sequence of torch.Tensor
        (V, 3) vertex positions, world RAS+ mm, of one mesh seen by every
        camera; or a list of M such tensors (one per mesh) together with
        ``mesh_index``. Gradients flow from the returned ``bary`` / ``depth``
        to ``verts`` on every backend (zbuffer and embree: away from silhouettes).
    faces : torch.Tensor or sequence of torch.Tensor
        (F, 3) int64 triangle vertex indices (or a list matching ``verts``).
    cameras : Cameras
        N cameras (see :mod:`mriface.render.cameras` for conventions).
    image_size : int
        Square image side S, pixels.
    backend : {"auto", "zbuffer", "pytorch3d", "embree"}
        ``"auto"``: zbuffer on CUDA, embree on the CPU.
    mesh_index : array_like of int, optional
        (N,) which mesh camera ``n`` sees, when lists are given.
    device : str or torch.device
        Where the returned fragments live ('auto' = CUDA when present; the CPU for embree).
    **backend_options
        Passed to the backend (pytorch3d: ``bin_size``, ``max_faces_per_bin``;
        zbuffer: ``max_candidates``; embree: ``bvh``, ``cull_backfaces``, ``threads``).

    Returns
    -------
    Fragments
        With ``pix_to_face`` indexing ``faces`` (or the faces of
        :func:`concat_meshes` applied to the lists).
    """
    dev = _device_for(backend, device)
    name = resolve_backend(backend, dev)
    if isinstance(verts, torch.Tensor):
        verts_list, faces_list = [verts], [torch.as_tensor(faces)]
        mesh_index = torch.zeros(len(cameras), dtype=torch.int64)
    else:
        verts_list = [torch.as_tensor(v) for v in verts]
        faces_list = [torch.as_tensor(f) for f in faces]
        if mesh_index is None:
            if len(verts_list) != len(cameras):
                raise BackendError(
                    f"rasterize got {len(verts_list)} meshes for {len(cameras)} cameras: "
                    "pass mesh_index=(which mesh each camera sees)"
                )
            mesh_index = torch.arange(len(cameras))
        mesh_index = torch.as_tensor(mesh_index, dtype=torch.int64).cpu()
    if len(mesh_index) != len(cameras):
        raise BackendError(f"mesh_index has {len(mesh_index)} entries for {len(cameras)} cameras: give one per camera")
    verts_list = [v.to(dev) for v in verts_list]
    faces_list = [f.to(dev, torch.int64) for f in faces_list]
    cameras = cameras.to(dev)
    if name == "pytorch3d":
        from .backend_pytorch3d import rasterize_pytorch3d

        return rasterize_pytorch3d(verts_list, faces_list, mesh_index, cameras, image_size, **backend_options)
    if name == "zbuffer":
        from .backend_zbuffer import rasterize_zbuffer

        return rasterize_zbuffer(verts_list, faces_list, mesh_index, cameras, image_size, **backend_options)
    from .backend_embree import rasterize_embree

    return rasterize_embree(verts_list, faces_list, mesh_index, cameras, image_size, **backend_options)
