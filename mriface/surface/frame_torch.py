"""Torch twin of :func:`~mriface.surface.estimate_face_frame` for closed head surfaces, any device.

Used by :func:`~mriface.surface.extract_head_surface` when ``engine="torch"``
(the default on CUDA). Same steps, parameters and random draws as
:mod:`.frame` (the draws come from numpy's generator with the same seed, so
both engines sample the same surface points); the per-point work (area
sampling, mirroring, nearest surface points, reach per direction) runs in
torch in float64. Differences from the numpy path:

- on a GPU, nearest neighbours are found by brute force (a distance matrix,
  chunked) instead of a k-d tree: exact up to ties within float32 rounding
  (on the CPU the k-d tree is kept: brute force there costs seconds);
- scipy's Nelder-Mead still drives the plane refinement on the host, each of
  its ~45 evaluations per candidate reading back one score;
- the no-nose fallback (a defaced head) reads the sampled points back and
  calls the numpy code (:func:`.frame._frame_without_nose`).
"""

from __future__ import annotations

import numpy as np

from ..errors import SurfaceError
from .frame import _MIN_NOSE_MM, _fibonacci_hemisphere, _frame_without_nose, _refine_planes
from .types import FaceFrame

__all__: "list[str]" = []

#: probe points per chunk of the brute-force nearest-neighbour search (x 15,000 surface points: 61 MB of float32)
_NN_CHUNK = 1024


def _nearest_fn(tree_pts, brute: "bool | None" = None):
    """``m (..., 3) -> index of the nearest row of tree_pts (N, 3)``, for tensors on ``tree_pts``'s device.

    On a GPU by brute force (a chunked float32 distance matrix: exact up to
    ties within its rounding); on the CPU through scipy's k-d tree, as the
    numpy path (a distance matrix there costs seconds per frame). ``brute``
    forces either (tests run the GPU's way on the CPU).
    """
    import torch

    if brute is False or (brute is None and tree_pts.device.type == "cpu"):
        from scipy.spatial import cKDTree

        tree = cKDTree(tree_pts.numpy())

        def nearest(m):
            _, idx = tree.query(m.reshape(-1, 3).numpy())
            return torch.from_numpy(idx.astype(np.int64)).reshape(m.shape[:-1])

        return nearest
    tp = tree_pts.float()

    def nearest(m):
        flat = m.reshape(-1, 3).float()
        out = torch.empty(flat.shape[0], dtype=torch.int64, device=m.device)
        for s in range(0, flat.shape[0], _NN_CHUNK):
            d = torch.cdist(flat[s:s + _NN_CHUNK], tp, compute_mode="use_mm_for_euclid_dist")
            out[s:s + _NN_CHUNK] = d.argmin(dim=1)
        return out.reshape(m.shape[:-1])

    return nearest


def _symmetry_plane_torch(points, normals, rng: np.random.Generator):
    """:func:`.frame._symmetry_plane` on tensors (points relative to their centroid; see there)."""
    import torch

    dev = points.device
    npts = points.shape[0]
    sel = torch.from_numpy(rng.choice(npts, min(npts, 15000), replace=False)).to(dev)
    c = points.mean(dim=0)
    # centred coordinates: the distance matrix's float32 rounding is then relative to the head's size
    tree_pts, tree_nrm = points[sel] - c, normals[sel]
    probe_all = points[torch.from_numpy(rng.choice(npts, min(npts, 500), replace=False)).to(dev)] - c
    nearest = _nearest_fn(tree_pts)

    def scores(ns, offs, probe):
        """Scores of the planes (K, 3) normals, (K,) offsets; a (K,) tensor."""
        ns = ns / torch.linalg.norm(ns, dim=1, keepdim=True)
        m = probe[None] - 2.0 * ((probe @ ns.T).T - offs[:, None])[..., None] * ns[:, None, :]  # (K, P, 3)
        idx = nearest(m)
        d = ((m - tree_pts[idx]) * tree_nrm[idx]).sum(-1).abs()
        return d.clamp(max=10.0).mean(dim=1)

    def score(n, off, probe=probe_all):
        n_t = torch.as_tensor(np.asarray(n, np.float64), device=dev)[None]
        return float(scores(n_t, torch.tensor([float(off)], dtype=torch.float64, device=dev), probe)[0])

    _, _, axes = torch.linalg.svd(tree_pts[:3000], full_matrices=False)
    cands = torch.cat([axes, torch.from_numpy(_fibonacci_hemisphere(100)).to(dev)])
    coarse_probe = probe_all[:250]
    proj = tree_pts[:3000] @ cands.T
    offs = 0.5 * (torch.quantile(proj, 0.01, dim=0) + torch.quantile(proj, 0.99, dim=0))
    # every candidate plane at once: one batch of mirrored points
    first = torch.cat([scores(cands[s:s + 16], offs[s:s + 16], coarse_probe) for s in range(0, len(cands), 16)])
    cands_np, offs_np, first_np = (x.cpu().numpy() for x in (cands, offs, first))
    grid = sorted((float(sc), i, float(off)) for i, (sc, off) in enumerate(zip(first_np, offs_np)))
    return _refine_planes(grid, cands_np, score, c.cpu().numpy())


def estimate_face_frame_torch(verts, faces, *, seed: int = 0) -> FaceFrame:
    """:func:`~mriface.surface.estimate_face_frame` of a closed head surface held as tensors.

    Parameters
    ----------
    verts : torch.Tensor
        (V, 3) vertex positions, mm, world RAS+ (any float dtype; used in float64).
    faces : torch.Tensor
        (F, 3) int64 indices, same device.
    seed : int
        Seed of the point subsampling (numpy's generator, as the numpy path).

    Returns
    -------
    FaceFrame
        numpy float64 vectors (read back: nine numbers).
    """
    import torch

    rng = np.random.default_rng(seed)
    dev = verts.device
    v = verts.double()
    if v.shape[0] < 100:
        raise SurfaceError(f"surface has only {v.shape[0]} vertices: too few to find a face")
    if faces is None or not len(faces):
        raise SurfaceError("a surface without faces has no face to find")
    nf = faces.shape[0]
    cand = torch.from_numpy(rng.integers(0, nf, size=min(4 * nf, 100_000))).to(dev)
    tri = v[faces[cand]]
    fn = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = torch.linalg.norm(fn, dim=1)
    u = torch.from_numpy(rng.random(cand.numel())).to(dev)
    keep = u * area.max() < area
    tri, fn, area = tri[keep][:40000], fn[keep][:40000], area[keep][:40000]
    bary = torch.from_numpy(rng.dirichlet([1.0, 1.0, 1.0], size=tri.shape[0])).to(dev)
    pts = torch.einsum("ij,ijk->ik", bary, tri)
    nrm = fn / area[:, None].clamp(min=1e-30)
    n, p0, _ = _symmetry_plane_torch(pts, nrm, rng)
    a = np.cross(n, [1.0, 0.0, 0.0] if abs(n[0]) < 0.9 else [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    n_t, p0_t = torch.from_numpy(n).to(dev), torch.from_numpy(p0).to(dev)
    side = (pts - p0_t) @ n_t
    mid = pts[side.abs() < 6.0]
    lat = pts[(side.abs() > 18.0) & (side.abs() < 35.0)]
    if mid.shape[0] < 50 or lat.shape[0] < 50:
        raise SurfaceError("surface is too narrow around its symmetry plane to hold a face")
    theta = np.deg2rad(np.arange(0, 360, 1.0))
    dirs = np.cos(theta)[:, None] * a + np.sin(theta)[:, None] * b
    dirs_t = torch.from_numpy(dirs).to(dev)
    prot = ((mid @ dirs_t.T).amax(dim=0) - (lat @ dirs_t.T).amax(dim=0)).cpu().numpy()
    kern = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
    kern /= kern.sum()
    prot_s = np.convolve(np.concatenate([prot[-6:], prot, prot[:6]]), kern, mode="valid")
    j = int(np.argmax(prot_s))
    near = np.flatnonzero(prot_s >= prot_s[j] - 0.2 * max(prot_s[j], 1e-9))
    rel = np.angle(np.exp(1j * (theta[near] - theta[j])))
    ok = np.abs(rel) < np.deg2rad(45)
    wts = prot_s[near][ok]
    th = theta[j] + float(np.sum(rel[ok] * wts) / np.sum(wts))
    forward = np.cos(th) * a + np.sin(th) * b
    forward /= np.linalg.norm(forward)
    f_t = torch.from_numpy(forward).to(dev)
    tip = mid[torch.argmax(mid @ f_t)]
    stats = torch.stack([tip @ f_t, (lat @ f_t).max()])
    tip, (tip_f, lat_f) = tip.cpu().numpy(), stats.cpu().numpy()
    protrusion = float(tip_f - lat_f)
    if protrusion < _MIN_NOSE_MM:
        return _frame_without_nose(pts.cpu().numpy(), n, p0, protrusion, "ras", None)
    up = np.cross(forward, n)
    up /= np.linalg.norm(up)
    if (pts.mean(dim=0).cpu().numpy() - tip) @ up < 0:
        up = -up
    tip_mid = tip - ((tip - p0) @ n) * n
    center = tip_mid + 15.0 * up - (protrusion + 5.0) * forward
    return FaceFrame(center=center.astype(np.float64), forward=forward, up=up)
