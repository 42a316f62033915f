"""CPU ray casting with Embree (through ``embreex``): the default CPU backend.

One primary ray per pixel centre, with the same pinhole model as the
pytorch3d backend (see :mod:`mriface.render.cameras`). Embree returns the hit
triangle, its barycentrics and the ray parameter; the ray direction has
camera-space z = 1, so that parameter is the depth ``z_cam`` in mm.

Gradients: Embree itself is not differentiable. When a vertex tensor needs a
gradient, the barycentrics and depth of every hit are recomputed in torch
(Moller-Trumbore) from the hit triangle and the ray, so the images are
differentiable with respect to vertex positions wherever the visible triangle
does not change (i.e. away from silhouettes and occlusion boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import BackendError
from .cameras import Cameras
from .rasterize import Fragments, front_faces

__all__ = ["EmbreeMesh", "build_bvh", "rasterize_embree", "ray_triangle_hits"]


@dataclass(eq=False)
class EmbreeMesh:
    """A committed Embree scene (BVH) of one triangle mesh, reusable for many views.

    Attributes
    ----------
    scene : embreex.rtcore_scene.EmbreeScene
    n_faces : int
    """

    scene: object
    n_faces: int

    def intersect(self, origins: np.ndarray, directions: np.ndarray):
        """Cast rays; returns (face id int64 (-1 miss), u, v, t) as numpy arrays of shape (R,).

        ``origins`` and ``directions`` are (R, 3) float32 world RAS+ (mm).
        """
        hit = self.scene.run(origins, directions, output=1)
        return hit["primID"].astype(np.int64), hit["u"], hit["v"], hit["tfar"]


def build_bvh(verts, faces) -> EmbreeMesh:
    """Build the Embree BVH of a mesh once.

    Parameters
    ----------
    verts : array_like
        (V, 3) vertex positions, world RAS+ mm.
    faces : array_like
        (F, 3) int triangle indices.

    Raises
    ------
    BackendError
        If ``embreex`` cannot be imported.
    """
    try:
        from embreex import mesh_construction, rtcore_scene
    except ImportError as exc:  # pragma: no cover - embreex is a hard dependency
        raise BackendError(
            "backend='embree' needs the 'embreex' package: pip install embreex, or use backend='pytorch3d'"
        ) from exc
    v = np.ascontiguousarray(_numpy(verts), dtype=np.float32)
    f = np.ascontiguousarray(_numpy(faces), dtype=np.int32)
    scene = rtcore_scene.EmbreeScene()
    mesh_construction.TriangleMesh(scene, v, f)
    return EmbreeMesh(scene, int(f.shape[0]))


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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


def rasterize_embree(
    verts_list: Sequence[torch.Tensor],
    faces_list: Sequence[torch.Tensor],
    mesh_index: torch.Tensor,
    cameras: Cameras,
    image_size: int,
    *,
    bvh: "Sequence[EmbreeMesh] | None" = None,
    cull_backfaces: bool = False,
) -> Fragments:
    """Embree implementation of :func:`mriface.render.rasterize`.

    Parameters
    ----------
    verts_list, faces_list : per-mesh (V_m, 3) float and (F_m, 3) int64 tensors.
    mesh_index : (N,) int64 mesh seen by each camera.
    cameras : N cameras; image_size : S.
    bvh : optional list of prebuilt :class:`EmbreeMesh`, one per mesh, to
        skip rebuilding (the vertex positions must not have moved).
    cull_backfaces : bool
        Leave out of the BVH every triangle that faces away from all of the
        mesh's cameras. Exact for closed, outward-oriented surfaces (a ray
        from outside first meets a triangle facing it) and it roughly halves
        BVH build and ray time for heads; wrong for open meshes seen from
        inside. Ignored when ``bvh`` is given.
    """
    dev = cameras.device
    if dev.type != "cpu":
        raise BackendError(f"backend='embree' runs on the CPU only (got device {dev}): use backend='pytorch3d' on CUDA")
    n, s = len(cameras), image_size
    face_offset = np.cumsum([0] + [int(f.shape[0]) for f in faces_list])
    needs_grad = torch.is_grad_enabled() and (
        any(v.requires_grad for v in verts_list) or cameras.R.requires_grad or cameras.T.requires_grad
    )
    # float64 vertices give float64 barycentrics (useful for finite-difference checks)
    dtype = torch.float64 if needs_grad and any(v.dtype == torch.float64 for v in verts_list) else torch.float32
    pix_to_face = torch.full((n, s * s), -1, dtype=torch.int64)
    depth = torch.full((n, s * s), -1.0, dtype=dtype)
    bary = torch.zeros((n, s * s, 3), dtype=dtype)
    centers = cameras.centers()
    R64 = cameras.R.detach().double().numpy()
    th64 = cameras.tan_half_fov().detach().double().numpy()
    c64 = centers.detach().double().numpy()
    ndc = 1.0 - (2.0 * np.arange(s) + 1.0) / s
    grad_parts = []
    for m in torch.unique(mesh_index).tolist():
        views = torch.nonzero(mesh_index == m).flatten()
        keep = None
        if bvh is not None:
            scene = bvh[m]
        elif cull_backfaces:
            keep_t = front_faces(verts_list[m], faces_list[m], centers[views])
            keep = keep_t.numpy()
            scene = build_bvh(verts_list[m], faces_list[m][keep_t])
        else:
            scene = build_bvh(verts_list[m], faces_list[m])
        # only pixels inside the mesh's projected bounding box can be hit: cast rays there only
        boxes = _pixel_boxes(verts_list[m], faces_list[m], cameras[views], s)
        counts = [(int(b[1]) - int(b[0])) * (int(b[3]) - int(b[2])) for b in boxes]
        total = sum(counts)
        if total == 0:
            continue
        o = np.empty((total, 3), np.float32)
        d = np.empty((total, 3), np.float32)
        pix = np.empty(total, np.int64)
        pos = 0
        for k, vi in enumerate(views.tolist()):
            r0, r1, c0, c1 = (int(x) for x in boxes[k])
            cnt = counts[k]
            if cnt == 0:
                continue
            rk = R64[vi].astype(np.float32)
            x = (ndc[c0:c1] * th64[vi]).astype(np.float32)
            y = (ndc[r0:r1] * th64[vi]).astype(np.float32)
            # d_world = d_cam @ R^T with d_cam = (x, y, 1): columns of R are the camera axes
            blk = d[pos:pos + cnt].reshape(r1 - r0, c1 - c0, 3)
            np.multiply(y[:, None, None], rk[:, 1], out=blk)
            blk += x[None, :, None] * rk[:, 0]
            blk += rk[:, 2]
            o[pos:pos + cnt] = c64[vi]
            pix[pos:pos + cnt] = (np.arange(r0, r1)[:, None] * s + np.arange(c0, c1)[None, :]).reshape(-1)
            pos += cnt
        fid, u, v, t = scene.intersect(o, d)
        hit = fid >= 0
        if keep is not None:
            fid[hit] = keep[fid[hit]]
        view_of_ray = torch.from_numpy(np.repeat(views.numpy(), counts))
        pix_of_ray = torch.from_numpy(pix)
        hv, hp = view_of_ray[torch.from_numpy(hit)], pix_of_ray[torch.from_numpy(hit)]
        fid_hit = torch.from_numpy(fid[hit])
        flat_hit = hv * (s * s) + hp
        pix_to_face.view(-1).index_copy_(0, flat_hit, fid_hit + int(face_offset[m]))
        if needs_grad:
            b, tt = ray_triangle_hits(
                verts_list[m].to(dtype), faces_list[m], fid_hit,
                centers[hv].to(dtype), torch.from_numpy(d[hit]).to(dtype),
            )
            grad_parts.append((hv, hp, b, tt))
        else:
            uh, vh = torch.from_numpy(u[hit]), torch.from_numpy(v[hit])
            bary.view(-1, 3).index_copy_(0, flat_hit, torch.stack([1 - uh - vh, uh, vh], dim=-1))
            depth.view(-1).index_copy_(0, flat_hit, torch.from_numpy(t[hit]))
    if grad_parts:
        # out-of-place scatter so autograd tracks it
        vr = torch.cat([g[0] for g in grad_parts])
        pr = torch.cat([g[1] for g in grad_parts])
        bary = bary.index_put((vr, pr), torch.cat([g[2] for g in grad_parts]))
        depth = depth.index_put((vr, pr), torch.cat([g[3] for g in grad_parts]))
    return Fragments(pix_to_face.reshape(n, s, s), bary.reshape(n, s, s, 3), depth.reshape(n, s, s))


def _pixel_boxes(verts: torch.Tensor, faces: torch.Tensor, cameras: Cameras, s: int, cell_mm: float = 8.0) -> np.ndarray:
    """(N, 4) int pixel box (row0, row1, col0, col1), end-exclusive, holding every pixel a mesh can cover.

    Conservative and cheap: the corners of the ``cell_mm`` grid cells that hold
    a vertex are projected instead of every vertex (a cell's projection lies in
    the hull of its corners' projections). The whole image where some corner
    lies at or behind the camera plane.
    """
    v = verts.detach().cpu().numpy().astype(np.float64, copy=False)
    q = np.floor(v / cell_mm).astype(np.int64)
    q -= q.min(axis=0)
    span = int(q.max()) + 2
    key = np.unique((q[:, 0] * span + q[:, 1]) * span + q[:, 2])
    cells = np.stack([key // (span * span), (key // span) % span, key % span], axis=1)
    base = np.floor(v.min(axis=0) / cell_mm) * cell_mm
    offs = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    pts = ((cells[:, None, :] + offs[None]).reshape(-1, 3) * cell_mm + base)
    R = cameras.R.detach().cpu().double().numpy()
    T = cameras.T.detach().cpu().double().numpy()
    th = cameras.tan_half_fov().detach().cpu().double().numpy()
    n = R.shape[0]
    out = np.tile(np.array([0, s, 0, s]), (n, 1))
    for k in range(n):
        cam = pts @ R[k] + T[k]
        z = cam[:, 2]
        if not (z > 1e-3).all():
            continue
        xs, ys = cam[:, 0] / z, cam[:, 1] / z
        # one pixel of margin: a pixel centre is hit only inside the projected triangles
        c0 = (1 - xs.max() / th[k]) * s / 2 - 1
        c1 = (1 - xs.min() / th[k]) * s / 2 + 1
        r0 = (1 - ys.max() / th[k]) * s / 2 - 1
        r1 = (1 - ys.min() / th[k]) * s / 2 + 1
        out[k] = [int(np.clip(np.floor(r0), 0, s)), int(np.clip(np.ceil(r1), 0, s)),
                  int(np.clip(np.floor(c0), 0, s)), int(np.clip(np.ceil(c1), 0, s))]
    return out
