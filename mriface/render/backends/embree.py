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

Speed (CPU): ``embreex`` copies the mesh into Embree element by element and
builds the BVH while holding the GIL, so :func:`build_bvh` hands it only the
vertices the (back-face culled) faces use; tracing releases the GIL, so
:func:`cast_hits` splits the rays into bands of rows traced by one thread per
core, each band generating its own rays and keeping only its hits. The
renderer then shades just those hits instead of full-size fragments.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ...errors import BackendError
from ..cameras import Cameras
from ..fragments import Hits
from ..geometry import front_faces, ray_triangle_hits
from .base import Scene

__all__ = ["EmbreeBackend", "EmbreeMesh", "build_bvh", "cast_hits"]


@dataclass(eq=False)
class EmbreeMesh:
    """A committed Embree scene (BVH) of one triangle mesh, reusable for many views.

    The BVH is built (committed) when the mesh is made, so several threads
    may cast rays into it at once (``embreex`` releases the GIL while it traces).

    Attributes
    ----------
    scene : embreex.rtcore_scene.EmbreeScene
    n_faces : int
    """

    scene: object
    n_faces: int

    def intersect(self, origins: np.ndarray, directions: np.ndarray, *, threads: "int | None" = None):
        """Cast rays; returns (face id int64 (-1 miss), u, v, t) as numpy arrays of shape (R,).

        ``origins`` and ``directions`` are (R, 3) float32 world RAS+ (mm).
        ``threads``: rays are split over this many threads (default: every CPU core).
        """
        n = int(origins.shape[0])
        threads = _n_threads(threads)
        if threads == 1 or n < 2 * _MIN_RAYS_PER_TASK:
            hit = self.scene.run(origins, directions, output=1)
            return hit["primID"].astype(np.int64), hit["u"], hit["v"], hit["tfar"]
        cuts = np.linspace(0, n, min(4 * threads, n // _MIN_RAYS_PER_TASK) + 1).astype(np.int64)
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda ab: self.scene.run(origins[ab[0]:ab[1]], directions[ab[0]:ab[1]], output=1),
                                  zip(cuts[:-1], cuts[1:])))
        return (np.concatenate([p["primID"] for p in parts]).astype(np.int64),
                np.concatenate([p["u"] for p in parts]), np.concatenate([p["v"] for p in parts]),
                np.concatenate([p["tfar"] for p in parts]))


#: rays per thread task: large enough that Python overhead is negligible (~1 ms of tracing)
_MIN_RAYS_PER_TASK = 16384


def _n_threads(threads) -> int:
    """``threads`` or, by default, the CPU cores this process may run on."""
    if threads is not None:
        return max(1, int(threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def build_bvh(verts, faces) -> EmbreeMesh:
    """Build the Embree BVH of a mesh once.

    Parameters
    ----------
    verts : array_like
        (V, 3) vertex positions, world RAS+ mm.
    faces : array_like
        (F, 3) int triangle indices. Face ``k`` of the BVH is row ``k`` of ``faces``.

    Raises
    ------
    BackendError
        If ``embreex`` cannot be imported.
    """
    try:
        from embreex import mesh_construction, rtcore_scene
    except ImportError as exc:  # pragma: no cover - embreex is a hard dependency
        raise BackendError(
            "backend='embree' needs the 'embreex' package: pip install embreex, or use backend='zbuffer'"
        ) from exc
    v = np.ascontiguousarray(_numpy(verts), dtype=np.float32)
    f = np.ascontiguousarray(_numpy(faces), dtype=np.int32)
    # embreex copies vertices and indices element by element (~0.3 us each, holding the GIL):
    # hand it only the vertices the faces use (about half of them after back-face culling).
    # Renumbering keeps the face order, so hit face ids are unchanged.
    used = np.zeros(v.shape[0], dtype=bool)
    used[f.reshape(-1)] = True
    if not used.all():
        remap = np.cumsum(used, dtype=np.int32) - 1
        v = np.ascontiguousarray(v[used])
        f = np.ascontiguousarray(remap[f])
    scene = rtcore_scene.EmbreeScene()
    mesh_construction.TriangleMesh(scene, v, f)
    # embreex builds the BVH on the first query: do it now, once, so that threads can share the scene
    scene.run(np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32), output=1)
    return EmbreeMesh(scene, int(f.shape[0]))


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cast_hits(
    scene: Scene,
    *,
    bvh: "Sequence[EmbreeMesh] | None" = None,
    cull_backfaces: bool = False,
    threads: "int | None" = None,
    _keep_dirs: bool = False,
):
    """Cast one primary ray per pixel centre and return only the hits, as Embree reports them.

    Options as :meth:`EmbreeBackend.hits`. No gradients: float32 barycentrics
    and depth straight from Embree.

    Returns
    -------
    Hits
        Sorted by pixel. With ``_keep_dirs`` also (M, 3) float32 numpy ray
        directions and (M,) int64 mesh of each hit, for the gradient path.
    """
    verts_list, faces_list, mesh_index, cameras = scene.verts_list, scene.faces_list, scene.mesh_index, scene.cameras
    dev = cameras.device
    if dev.type != "cpu":
        raise BackendError(f"backend='embree' runs on the CPU only (got device {dev}): use backend='zbuffer' on CUDA")
    s = scene.image_size
    face_offset = np.cumsum([0] + [int(f.shape[0]) for f in faces_list])
    centers = cameras.centers()
    R64 = cameras.R.detach().double().numpy()
    th64 = cameras.tan_half_fov().detach().double().numpy()
    c64 = centers.detach().double().numpy()
    ndc = 1.0 - (2.0 * np.arange(s) + 1.0) / s
    threads = _n_threads(threads)
    parts = []
    with ThreadPoolExecutor(threads) as pool:
        for m in torch.unique(mesh_index).tolist():
            views = torch.nonzero(mesh_index == m).flatten().tolist()
            keep = None
            if bvh is not None:
                mesh_bvh = bvh[m]
            elif cull_backfaces:
                keep_t = front_faces(verts_list[m], faces_list[m], centers[views])
                keep = keep_t.numpy()
                mesh_bvh = build_bvh(verts_list[m], faces_list[m].index_select(0, keep_t))
            else:
                mesh_bvh = build_bvh(verts_list[m], faces_list[m])
            # only pixels inside the mesh's projected bounding box can be hit: cast rays there only
            boxes = _pixel_boxes(verts_list[m], faces_list[m], cameras[views], s)
            tasks = []
            for k, vi in enumerate(views):
                r0, r1, c0, c1 = (int(x) for x in boxes[k])
                if r1 <= r0 or c1 <= c0:
                    continue
                # bands of rows, so that both cores stay busy to the end
                step = max(1, -(-_MIN_RAYS_PER_TASK * 2 // (c1 - c0)))
                for a in range(r0, r1, step):
                    tasks.append((vi, a, min(a + step, r1), c0, c1))
            rays = functools.partial(_trace_band, mesh_bvh, keep, int(face_offset[m]), R64, th64, c64, ndc, s,
                                     _keep_dirs)
            parts.extend((*res, m) for res in pool.map(rays, tasks) if res[0].shape[0])
    if not parts:
        hits = scene.empty_hits(torch.float32)
        return (hits, np.zeros((0, 3), np.float32), np.zeros(0, np.int64)) if _keep_dirs else hits
    pix = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    order = None
    if len(parts) > 1 and not bool((pix[1:] > pix[:-1]).all()):
        # several meshes' views interleave: sort by pixel (views of one mesh come out in order)
        order = torch.argsort(pix)
        pix = pix[order]

    def cat(i):
        x = torch.cat([p[i] for p in parts]) if isinstance(parts[0][i], torch.Tensor) else \
            torch.from_numpy(np.concatenate([p[i] for p in parts]))
        return x if order is None else x[order]

    hits = Hits(pix, cat(1), cat(2), cat(3), scene.n_images, s)
    if not _keep_dirs:
        return hits
    mesh_of = np.concatenate([np.full(p[0].shape[0], p[5], np.int64) for p in parts])
    return hits, cat(4).numpy(), (mesh_of if order is None else mesh_of[order.numpy()])


def _trace_band(scene: EmbreeMesh, keep, face_offset: int, R64, th64, c64, ndc, s: int, keep_dirs: bool, task):
    """Trace the pixels (rows r0:r1, columns c0:c1) of view ``vi``; returns the hits only.

    Runs in a worker thread: numpy, Embree and torch release the GIL for the heavy parts.
    Returns (pixel int64 numpy, face int64 numpy, bary (M, 3) tensor, depth (M,) numpy,
    directions (M, 3) numpy or None).
    """
    vi, r0, r1, c0, c1 = task
    h, w = r1 - r0, c1 - c0
    rk = R64[vi].astype(np.float32)
    x = (ndc[c0:c1] * th64[vi]).astype(np.float32)
    y = (ndc[r0:r1] * th64[vi]).astype(np.float32)
    # d_world = d_cam @ R^T with d_cam = (x, y, 1): columns of R are the camera axes
    d = np.empty((h, w, 3), np.float32)
    np.multiply(y[:, None, None], rk[:, 1], out=d)
    d += x[None, :, None] * rk[:, 0]
    d += rk[:, 2]
    d = d.reshape(h * w, 3)
    o = np.empty((h * w, 3), np.float32)
    o[:] = c64[vi]
    hit = scene.scene.run(o, d, output=1)
    prim = hit["primID"].view(np.int32)  # a miss is 0xFFFFFFFF, i.e. -1
    idx = np.flatnonzero(prim >= 0)
    rows, cols = np.divmod(idx, w)
    pix = (vi * s + r0 + rows) * s + (c0 + cols)
    fid = prim[idx].astype(np.int64)
    if keep is not None:
        fid = keep[fid]
    fid += face_offset
    u, v = torch.from_numpy(hit["u"][idx]), torch.from_numpy(hit["v"][idx])
    bary = torch.stack([1 - u - v, u, v], dim=-1)
    return pix, fid, bary, hit["tfar"][idx], (d[idx] if keep_dirs else None)


class EmbreeBackend:
    """Ray casting with Embree on every CPU core (this module's docstring says how); CPU only.

    One subject per call (one BVH per mesh, built once for all its views).
    Options of :meth:`hits`: ``bvh``, ``cull_backfaces``, ``threads``.
    """

    name = "embree"
    default_device = "cpu"
    batches_meshes = False

    def hits(
        self,
        scene: Scene,
        *,
        bvh: "Sequence[EmbreeMesh] | None" = None,
        cull_backfaces: bool = False,
        threads: "int | None" = None,
    ) -> Hits:
        """Visible triangle, barycentrics and depth of every covered pixel.

        Parameters
        ----------
        scene : Scene
            On the CPU.
        bvh : optional list of prebuilt :class:`EmbreeMesh`, one per mesh, to
            skip rebuilding (the vertex positions must not have moved).
        cull_backfaces : bool
            Leave out of the BVH every triangle that faces away from all of the
            mesh's cameras. Exact for closed, outward-oriented surfaces (a ray
            from outside first meets a triangle facing it) and it roughly halves
            BVH build and ray time for heads; wrong for open meshes seen from
            inside. Ignored when ``bvh`` is given.
        threads : int, optional
            Threads tracing rays (default: every CPU core).

        Returns
        -------
        Hits
            float32 barycentrics and depth from Embree; when
            ``scene.requires_grad()``, recomputed in torch from the hit triangles
            and the traced rays (float64 if a vertex tensor is float64), so
            they are differentiable w.r.t. the vertices away from silhouettes.
        """
        needs_grad = scene.requires_grad()
        out = cast_hits(scene, bvh=bvh, cull_backfaces=cull_backfaces, threads=threads, _keep_dirs=needs_grad)
        if not needs_grad:
            return out
        hits, dirs, mesh_of = out
        # float64 vertices give float64 barycentrics (useful for finite-difference checks)
        dtype = scene.dtype
        if not hits.pixel.shape[0]:
            return scene.empty_hits(dtype)
        s = scene.image_size
        view = torch.div(hits.pixel, s * s, rounding_mode="floor")
        centers = scene.cameras.centers()
        b_parts, t_parts, rows = [], [], []
        for m in np.unique(mesh_of).tolist():
            sel = torch.from_numpy(np.flatnonzero(mesh_of == m))
            b, tt = ray_triangle_hits(
                scene.verts_list[m].to(dtype), scene.faces_list[m], hits.face[sel] - scene.face_offsets[m],
                centers[view[sel]].to(dtype), torch.from_numpy(dirs[sel.numpy()]).to(dtype),
            )
            b_parts.append(b); t_parts.append(tt); rows.append(sel)
        # back into pixel order (a permutation: gradients pass unchanged)
        back = torch.argsort(torch.cat(rows))
        return Hits(hits.pixel, hits.face, torch.cat(b_parts)[back], torch.cat(t_parts)[back], scene.n_images, s)


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
    dims = q.max(axis=0) + 1
    if int(np.prod(dims)) <= 1 << 26:
        # occupancy grid: the same cells as np.unique, without sorting every vertex
        occ = np.zeros(tuple(int(x) for x in dims), dtype=bool)
        occ[q[:, 0], q[:, 1], q[:, 2]] = True
        cells = np.argwhere(occ)
    else:  # a huge, sparse extent (stray vertices far away): sort instead
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
