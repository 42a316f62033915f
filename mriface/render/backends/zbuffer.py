"""A pure-torch z-buffer rasterizer for dense meshes: the default CUDA backend.

Made for heads of a few hundred thousand ~1 mm triangles at 512x512, where most
triangles cover a window of 1x1 to 4x4 pixels. Per view:

1. project every vertex (the conventions of :mod:`mriface.render.cameras`;
   pixel centre of column ``j`` at ``x_ndc = 1 - (2j + 1)/S``, +X image left);
2. give every triangle the box of pixel centres its projection can contain,
   clipped to the image, and sort triangles into size classes by the box's
   larger side rounded up to a power of two (1, 2, 4, ..., up to the image);
3. per class, test the class's W x W candidate pixels of every triangle at once
   (vectorised, chunked to ``max_candidates``) with screen-space edge
   functions; a pixel centre exactly on an edge counts as inside (a centre on a
   shared edge goes to either neighbour, decided by the z-buffer key);
4. resolve visibility with one ``scatter_reduce_(..., "amin")`` per chunk into
   an int64 key per pixel: the float32 bit pattern of the candidate's depth
   (monotonic for positive floats) in the high 32 bits, the triangle's row in
   its mesh in the low 32 bits, so the nearest triangle wins and exact depth
   ties go to the lower row: deterministic, whatever the scheduling;
5. recompute barycentrics and depth of every covered pixel in torch from its
   pixel ray and the winning triangle (:func:`~mriface.render.geometry.ray_triangle_hits`,
   as the embree backend does), so images are differentiable w.r.t. vertex
   positions away from silhouettes.

Triangles with a vertex at or in front of the near plane (``z_cam <=
cameras.znear``) are dropped for that view: heads are always far in front of
the camera, and clipping would only matter for a camera inside the mesh.
Large triangles simply fall into a large class, so correctness never depends
on triangle size (a triangle filling the image is one chunk of S x S candidates).
"""

from __future__ import annotations

import torch

from ...errors import BackendError
from ..cameras import Cameras
from ..fragments import Hits
from ..geometry import ray_triangle_hits
from .base import Scene

__all__ = ["ZBufferBackend", "visible_faces", "MAX_CANDIDATES"]

#: default candidate pixels tested per chunk (up to about 60 bytes each while a chunk is live)
MAX_CANDIDATES = 1 << 24
#: (view, triangle) pairs projected at once, bounding the per-view triangle arrays
_MAX_PAIRS = 1 << 23
_EMPTY = torch.iinfo(torch.int64).max


def _windows(s: int) -> list:
    """Window sides of the size classes: 1, 2, 4, ... up to the first at least ``s``."""
    out = [1]
    while out[-1] < s:
        out.append(out[-1] * 2)
    return out


def _triangle_windows(verts: torch.Tensor, faces: torch.Tensor, cameras: Cameras, s: int):
    """Per (view, triangle) pair: screen vertices, 1/z and the clipped box of pixel centres.

    Returns a dict of flat (P,) tensors over the kept pairs (triangles in front
    of the near plane with a non-empty box and non-zero area), with edge
    functions normalised so that inside means all three are >= 0.
    """
    n_views = len(cameras)
    dt = torch.float64 if verts.dtype == torch.float64 else torch.float32
    cam = cameras.world_to_camera(verts.detach().to(dt))  # (N, V, 3)
    th = cameras.tan_half_fov().to(dt)[:, None]
    z = cam[..., 2]
    # continuous pixel coordinates: centre of pixel (j, i) at (j + 0.5, i + 0.5)
    u = (1 - cam[..., 0] / (z * th)) * (s / 2)
    v = (1 - cam[..., 1] / (z * th)) * (s / 2)
    f0, f1, f2 = faces[:, 0], faces[:, 1], faces[:, 2]
    u0, u1, u2 = u[:, f0], u[:, f1], u[:, f2]
    v0, v1, v2 = v[:, f0], v[:, f1], v[:, f2]
    z0, z1, z2 = z[:, f0], z[:, f1], z[:, f2]
    front = (torch.minimum(torch.minimum(z0, z1), z2) > cameras.znear)
    # columns j whose centre j + 0.5 lies in [umin, umax]
    c0 = torch.ceil(torch.minimum(torch.minimum(u0, u1), u2) - 0.5).clamp(min=0)
    c1 = torch.floor(torch.maximum(torch.maximum(u0, u1), u2) - 0.5).clamp(max=s - 1)
    r0 = torch.ceil(torch.minimum(torch.minimum(v0, v1), v2) - 0.5).clamp(min=0)
    r1 = torch.floor(torch.maximum(torch.maximum(v0, v1), v2) - 0.5).clamp(max=s - 1)
    area = (u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0)
    keep = front & (c1 >= c0) & (r1 >= r0) & (area != 0) & torch.isfinite(area)
    view_id, face_id = torch.nonzero(keep, as_tuple=True)
    g = lambda x: x[view_id, face_id]  # noqa: E731
    u0, u1, u2, v0, v1, v2 = g(u0), g(u1), g(u2), g(v0), g(v1), g(v2)
    c0, c1, r0, r1, area = g(c0), g(c1), g(r0), g(r1), g(area)
    sign = torch.sign(area)
    # edge function opposite vertex k at the window's first pixel centre, and its steps per column / row;
    # multiplied by sign(area) so that inside is "all >= 0" for either winding
    pu, pv = c0 + 0.5, r0 + 0.5
    edges = []
    for (ua, va), (ub, vb) in (((u1, v1), (u2, v2)), ((u2, v2), (u0, v0)), ((u0, v0), (u1, v1))):
        e = ((ub - ua) * (pv - va) - (vb - va) * (pu - ua)) * sign
        edges.append((e, -(vb - va) * sign, (ub - ua) * sign))
    iz = torch.stack([1 / g(z0), 1 / g(z1), 1 / g(z2)], dim=1)
    ext = torch.maximum(c1 - c0, r1 - r0).to(torch.int64) + 1
    return {
        "view": view_id, "face": face_id, "c0": c0.to(torch.int64), "r0": r0.to(torch.int64),
        "w": (c1 - c0).to(torch.int64) + 1, "h": (r1 - r0).to(torch.int64) + 1, "ext": ext,
        "edges": edges, "iz": iz, "area": area.abs(), "n_views": n_views,
    }


def _resolve_class(p: dict, sel: torch.Tensor, win: int, s: int, view_base: torch.Tensor, zbuf: torch.Tensor):
    """Test the win x win candidate pixels of the pairs ``sel`` and fold them into ``zbuf``."""
    dev = sel.device
    dx = torch.arange(win, device=dev).repeat(win)  # (win*win,) column offset
    dy = torch.arange(win, device=dev).repeat_interleave(win)
    inside = (dx[None, :] < p["w"][sel, None]) & (dy[None, :] < p["h"][sel, None])
    dt = p["iz"].dtype
    dxf, dyf = dx.to(dt)[None, :], dy.to(dt)[None, :]
    es = []
    for e0, a, b in p["edges"]:
        e = e0[sel, None] + a[sel, None] * dxf + b[sel, None] * dyf
        inside &= e >= 0
        es.append(e)
    pair, cand = torch.nonzero(inside, as_tuple=True)
    if pair.numel() == 0:
        return
    sp = sel[pair]
    iz = p["iz"][sp]
    # perspective-correct depth: 1/z is linear in screen space (edge values / area = screen barycentrics)
    w0, w1, w2 = es[0][pair, cand], es[1][pair, cand], es[2][pair, cand]
    depth = (p["area"][sp] / (w0 * iz[:, 0] + w1 * iz[:, 1] + w2 * iz[:, 2])).to(torch.float32)
    bits = depth.view(torch.int32).to(torch.int64)  # order-preserving for positive floats
    key = (bits << 32) | p["face"][sp]
    pix = view_base[p["view"][sp]] + (p["r0"][sp] + dy[cand]) * s + (p["c0"][sp] + dx[cand])
    zbuf.scatter_reduce_(0, pix, key, "amin")


class ZBufferBackend:
    """The pure-torch z-buffer rasterizer (this module's docstring says how it works).

    Runs on the CPU and on CUDA (``"auto"``: CUDA when present) and batches
    several subjects' meshes per call. Option of :meth:`hits`:
    ``max_candidates`` (candidate pixels tested per chunk; lower it if memory
    runs out: peak memory is roughly 60 bytes x this, plus an (N, S, S) int64 buffer).
    """

    name = "zbuffer"
    default_device = "auto"
    batches_meshes = True

    def hits(self, scene: Scene, *, max_candidates: int = MAX_CANDIDATES) -> Hits:
        """Visible triangle, barycentrics and depth of every covered pixel.

        float64 barycentrics and depth when a float64 vertex tensor is given,
        float32 otherwise; differentiable w.r.t. the vertices (and the
        cameras' R, T) away from silhouettes.
        """
        if not isinstance(max_candidates, int) or max_candidates < 1:
            raise BackendError(f"max_candidates={max_candidates!r}: give a positive int (candidate pixels per chunk)")
        dtype = scene.dtype
        with torch.no_grad():  # visibility is piecewise constant: the gradient path is the ray recomputation below
            pixel, face = visible_faces(scene, max_candidates=max_candidates)
        if not pixel.numel():
            return scene.empty_hits(dtype)
        v_all, f_all = scene.joined
        bary, depth = ray_triangle_hits(v_all.to(dtype), f_all, face, *scene.pixel_rays(pixel, dtype))
        return Hits(pixel, face, bary, depth, scene.n_images, scene.image_size)


def visible_faces(scene: Scene, *, max_candidates: int = MAX_CANDIDATES):
    """Visible triangle of every pixel (no barycentrics): the z-buffer pass.

    Returns
    -------
    pixel : torch.Tensor
        (M,) int64 flat index ``view * S * S + row * S + col`` of each covered pixel, increasing.
    face : torch.Tensor
        (M,) int64 visible row of the concatenated faces (``scene.joined``).
    """
    verts_list, faces_list, mesh_index, cameras = scene.verts_list, scene.faces_list, scene.mesh_index, scene.cameras
    s = scene.image_size
    dev = cameras.device
    n = len(cameras)
    zbuf = torch.full((n * s * s,), _EMPTY, dtype=torch.int64, device=dev)
    mesh_index = torch.as_tensor(mesh_index, dtype=torch.int64).cpu()
    offsets = scene.face_offsets
    face_offset_of_view = torch.zeros(n, dtype=torch.int64)
    for m in torch.unique(mesh_index).tolist():
        views = torch.nonzero(mesh_index == m).flatten()
        face_offset_of_view[views] = offsets[m]
        f = faces_list[m]
        if f.shape[0] == 0:
            continue
        step = max(1, _MAX_PAIRS // int(f.shape[0]))
        for a in range(0, len(views), step):
            vs = views[a:a + step].to(dev)
            p = _triangle_windows(verts_list[m], f, cameras[vs], s)
            if p["view"].numel() == 0:
                continue
            view_base = vs * (s * s)
            wins = _windows(s)
            # size class = the smallest window holding the box; one sort and one host sync for all classes
            cls = torch.searchsorted(torch.tensor(wins, device=dev), p["ext"])
            order = torch.argsort(cls, stable=True)
            counts = torch.bincount(cls, minlength=len(wins)).tolist()
            start = 0
            for win, count in zip(wins, counts):
                per = max(1, max_candidates // (win * win))
                for b in range(start, start + count, per):
                    _resolve_class(p, order[b:min(b + per, start + count)], win, s, view_base, zbuf)
                start += count
    pixel = torch.nonzero(zbuf != _EMPTY).flatten()
    local = zbuf[pixel] & 0xFFFFFFFF
    face = local + face_offset_of_view.to(dev)[torch.div(pixel, s * s, rounding_mode="floor")]
    return pixel, face
