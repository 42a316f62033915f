"""The ``adversarial`` defacing method: move the skin a few millimetres so the face model no longer knows the face.

Instead of removing the face, the skin surface inside the face region is
pushed along its normals by a small, smooth displacement field (at most
``max_displacement_mm``) chosen with the differentiable renderer and a face
model's gradients so that the embeddings of the head's renders move away
from the person's own identity. The objective is the expectation over the
render protocol's random views, lights and skin tones (a pool of views drawn
with :func:`mriface.render.sample_view_params`, a random batch per step).

Chain of gradients: displacement (per vertex, along the normal) -> vertices
-> :func:`mriface.render.rasterize` (``zbuffer``: barycentrics and depth are
differentiable away from silhouettes) and :func:`mriface.render.shade`
(normals recomputed from the vertices) -> images -> the aligner's similarity
warp onto the ArcFace template with the MTCNN landmarks found once on the
initial renders (fixed per view; ``grid_sample`` is differentiable in the
image) -> ``embedder.embed_differentiable``.

Bounds: the displacement is ``max_displacement_mm * w * tanh(S p)`` with
``w`` in [0, 1] rising over ``ramp_mm`` inside the face region (0 outside it,
so the edit fades out at the region's border), ``S`` a few steps of
neighbour averaging on the mesh (smooth by construction) and a Laplacian
penalty on top; the face stays a face (MTCNN's detection rate on the final
renders is measured and returned).

Written back to the volume: every voxel of the face region within
``shell_mm`` of the skin takes the intensity found at ``x - u(x)``, where
``u`` is the displacement of the nearest vertices (inverse-distance weighted
over 4) fading linearly with the distance along their normal: a smooth,
invertible warp of the volume near the skin (``|du/ds| <= max / shell < 1``).
:func:`extract_head_surface` of the result gives the moved skin; the method
re-extracts it and reports the distance to the optimised surface. Brain
voxels are never in the face region and are put back by
:func:`~mriface.deface.core.run_method` in any case.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..volume import Volume
from .core import DefaceContext, DefaceError, register_method

__all__ = ["adversarial_face", "vertex_face_weight", "warp_volume_near_skin", "smoothing_operator"]


def vertex_face_weight(volume: Volume, region: np.ndarray, verts: np.ndarray, ramp_mm: float) -> np.ndarray:
    """(V,) weight in [0, 1]: 0 outside ``region``, rising to 1 at ``ramp_mm`` inside its border.

    ``verts`` are world RAS+ mm; ``region`` is a bool mask on ``volume``'s grid.
    """
    from scipy import ndimage as ndi

    if not region.any():
        return np.zeros(len(verts), np.float32)
    idx = np.argwhere(region)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, region.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dist = ndi.distance_transform_edt(region[box], sampling=volume.zooms)
    inv = np.linalg.inv(volume.affine)
    ijk = verts @ inv[:3, :3].T + inv[:3, 3] - lo
    d = ndi.map_coordinates(dist.astype(np.float32), ijk.T, order=1, mode="constant", cval=0.0)
    return np.clip(d / max(ramp_mm, 1e-6), 0.0, 1.0).astype(np.float32)


def smoothing_operator(faces: np.ndarray, n_verts: int, device) -> torch.Tensor:
    """Sparse (V, V) row-normalised averaging over each vertex and its mesh neighbours."""
    f = torch.as_tensor(np.asarray(faces, np.int64))
    i = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0], torch.arange(n_verts)])
    j = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2], torch.arange(n_verts)])
    a = torch.sparse_coo_tensor(torch.stack([i, j]), torch.ones(len(i)), (n_verts, n_verts), check_invariants=False).coalesce()
    a = torch.sparse_coo_tensor(a.indices(), torch.ones_like(a.values()), a.shape, check_invariants=False).coalesce()  # 0/1 adjacency
    deg = torch.sparse.sum(a, 1).to_dense()
    vals = a.values() / deg[a.indices()[0]]
    return torch.sparse_coo_tensor(a.indices(), vals, a.shape, check_invariants=False).coalesce().to(device)


def warp_volume_near_skin(volume: Volume, region: np.ndarray, verts: np.ndarray, normals: np.ndarray,
                          disp_mm: np.ndarray, *, shell_mm: float) -> np.ndarray:
    """Move the skin of ``volume`` by ``disp_mm`` along ``normals``: a smooth warp of the voxels near it.

    Parameters
    ----------
    volume : Volume
    region : numpy.ndarray
        bool (X, Y, Z): only these voxels may change.
    verts, normals : numpy.ndarray
        (V, 3) skin vertices (world mm) and unit outward normals.
    disp_mm : numpy.ndarray
        (V,) displacement along the normal, mm (positive = outwards).
    shell_mm : float
        Voxels farther than this from the skin (along the normal) do not move.

    Returns
    -------
    numpy.ndarray
        float32 (X, Y, Z): the new voxel array.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    out = volume.data.astype(np.float32, copy=True)
    moving = np.abs(disp_mm) > 1e-3
    if not moving.any():
        return out
    # only voxels of the region within the shell around the moving part of the skin
    inv = np.linalg.inv(volume.affine)
    lo_w, hi_w = verts[moving].min(0) - shell_mm, verts[moving].max(0) + shell_mm
    corners = np.array([[x, y, z] for x in (lo_w[0], hi_w[0]) for y in (lo_w[1], hi_w[1]) for z in (lo_w[2], hi_w[2])])
    cijk = corners @ inv[:3, :3].T + inv[:3, 3]
    lo = np.clip(np.floor(cijk.min(0)).astype(int), 0, region.shape)
    hi = np.clip(np.ceil(cijk.max(0)).astype(int) + 1, 0, region.shape)
    sub = region[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    ijk = np.argwhere(sub) + lo
    if len(ijk) == 0:
        return out
    xyz = ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    near = np.flatnonzero(np.linalg.norm(verts - verts[moving].mean(0), axis=1)
                          <= np.linalg.norm(hi_w - lo_w) / 2 + shell_mm)
    tree = cKDTree(verts[near])
    dist, k = tree.query(xyz, k=4, distance_upper_bound=shell_mm)
    ok = np.isfinite(dist[:, 0])
    xyz, ijk, dist, k = xyz[ok], ijk[ok], dist[ok], k[ok]
    k = np.where(np.isfinite(dist), k, 0)
    v, n, d = verts[near][k], normals[near][k], disp_mm[near][k]  # (M, 4, ...)
    s = np.einsum("mkc,mkc->mk", xyz[:, None, :] - v, n)  # distance along each vertex's normal
    fall = np.clip(1.0 - np.abs(s) / shell_mm, 0.0, 1.0)
    wk = np.where(np.isfinite(dist), 1.0 / (dist + 0.5), 0.0)
    u = np.einsum("mk,mkc->mc", wk * d * fall, n) / wk.sum(1, keepdims=True)
    src = (xyz - u) @ inv[:3, :3].T + inv[:3, 3]
    out[tuple(ijk.T)] = ndi.map_coordinates(volume.data.astype(np.float32, copy=False), src.T, order=1, mode="nearest")
    return out


def _embed_fn(emb):
    """The face model's differentiable embedding: ``embed_differentiable``, or its torch ``model`` (FaceNet)."""
    if hasattr(emb, "embed_differentiable"):
        return emb.embed_differentiable
    net = getattr(emb, "model", None)
    if isinstance(net, torch.nn.Module):  # FaceNet: the InceptionResnetV1 that embed() runs (eval mode)
        def run(crops):
            x = crops.to(emb.device, getattr(emb, "dtype", torch.float32))
            return torch.nn.functional.normalize(net(x).float(), dim=1)
        return run
    raise DefaceError(f"adversarial: face model {getattr(emb, 'name', emb)!r} has no embed_differentiable() and "
                      "no torch model to differentiate; use model='arcface-mbf', 'sface' or 'facenet'")


def _crop_fn(embedder, aligner, alignment, rows):
    """A differentiable (B, H, W, 3) [0, 1] images -> (B, 3, S, S) model-input crops for fixed views ``rows``."""
    from ..recognition.align import _warp_arcface  # the aligner's own differentiable similarity warp

    spec = embedder.crop
    if spec.alignment == "arcface":
        marks = alignment.landmarks[rows].to(torch.float64)

        def crop(images, sel):
            x = images.permute(0, 3, 1, 2) * 255.0
            return spec.normalise(_warp_arcface(x, marks[sel].to(x.device), spec.size))
    else:  # "box": MTCNN box with the aligner's margin (roi_align is differentiable in the image)
        boxes = alignment.boxes[rows]

        def crop(images, sel):
            x = images.permute(0, 3, 1, 2) * 255.0
            return spec.normalise(aligner._box_crop(x, boxes[sel].to(x.device, x.dtype), spec.size))
    return crop


def _frame_landmarks(frame, cams, image_size: int) -> torch.Tensor:
    """(N, 5, 2) pixel positions of the ArcFace template's five points placed on the face frame.

    The fallback alignment when MTCNN finds no face in any render of the
    original head (synthetic phantoms): the template, at 1.8 mm per template
    pixel (63 mm between the eyes), is laid on the plane through the frame's
    centre facing ``forward`` and projected into every view.
    """
    from ..recognition.models import ARCFACE_TEMPLATE

    t = np.asarray(ARCFACE_TEMPLATE, np.float64)
    pts = (np.asarray(frame.center)[None] + 1.8 * (t[:, :1] - 56.0) * np.asarray(frame.right)[None]
           - 1.8 * (t[:, 1:] - 62.0) * np.asarray(frame.up)[None] + 20.0 * np.asarray(frame.forward)[None])
    p = torch.as_tensor(pts, dtype=torch.float64, device=cams.R.device)
    return cams.to(cams.R.device, torch.float64).project(p, image_size).to(torch.float32).cpu()


def adversarial_face(volume: Volume, context: DefaceContext, *, max_displacement_mm: float = 4.0,
                     model: "str | object" = "arcface-mbf", weights=None, random_weights: bool = False,
                     steps: int = 12, target_similarity: float = 0.25, views: int = 12, batch_views: int = 4,
                     image_size: int = 256, lr: float = 0.15, smooth_iters: int = 10, smooth_weight: float = 2.0, ramp_mm: float = 8.0,
                     shell_mm: "float | None" = None, seed: "int | None" = None, device="auto",
                     backend: str = "zbuffer", target_faces: "int | None" = None, verify: bool = True,
                     info: "dict | None" = None):
    """Move the face's skin by at most ``max_displacement_mm`` so that the face model no longer matches it.

    Parameters
    ----------
    max_displacement_mm : float
        Largest displacement of the skin along its normal (mm); the bound is
        exact for the optimised mesh (``tanh`` times a weight <= 1).
    model : str or Embedder
        The face model whose gradients steer the edit (needs
        ``embed_differentiable`` or a torch ``model``): ``"arcface-mbf"``
        (default), ``"sface"`` or ``"facenet"``.
    weights, random_weights
        Passed to :func:`mriface.recognition.get_model` for a model name.
    steps : int
        Most Adam steps.
    target_similarity : float
        Stop once the mean cosine similarity of a step's renders to the
        person's own identity (mean embedding of the original renders) is
        below this: far enough to be a stranger to the model (ArcFace
        impostor pairs are mostly below 0.3), near enough that the face stays
        a face (pushing on to negative similarity broke MTCNN's detection on
        the 2 mm average head: 4 of 12 renders after 12 steps).
    views : int
        Size of the pool of random views (the render protocol's ranges, seed
        ``seed + 1``: not the study's draws); views where MTCNN finds no face
        on the original head are dropped.
    batch_views : int
        Views rendered per step (a random subset of the pool).
    image_size : int
        Render side in pixels (the landmarks are found at this size).
    lr : float
        Adam's step on the unbounded parameters.
    smooth_iters : int
        Steps of neighbour averaging applied to the parameters.
    smooth_weight : float
        Weight of the Laplacian penalty (mean squared mm).
    ramp_mm : float
        The displacement fades in over this distance inside the face region.
    shell_mm : float, optional
        Thickness of the warped layer on each side of the skin (default
        ``3 * max_displacement_mm``, at least 6 mm).
    seed : int, optional
        Default: the context's seed.
    device : str or torch.device
        Where rendering and the face model run ('auto' = CUDA when present).
    backend : str
        Rasterizer with vertex gradients (``zbuffer``; ``pytorch3d`` also works).
    target_faces : int, optional
        Decimate the skin mesh that is optimised to about this many
        triangles (faster; the volume is warped from it all the same).
    verify : bool
        Re-extract the surface of the result and measure its distance to the optimised skin.
    info : dict, optional
        Filled with what happened (also in :attr:`DefaceResult.info`).
    """
    from .._device import resolve_device
    from ..recognition import ARCFACE_CROP, FaceAligner, get_model
    from ..render import RenderProtocol, front_faces, rasterize, sample_view_params, scene_from_params, shade
    from ..render.protocol import _light_world
    from ..surface import extract_head_surface

    t0 = time.perf_counter()
    if not context.face.any():
        raise DefaceError(f"{volume.name}: the face region is empty on this scan's grid (adversarial); "
                          "is the face inside the field of view?")
    if not max_displacement_mm > 0:
        raise DefaceError(f"adversarial: max_displacement_mm={max_displacement_mm}: give a positive bound (mm)")
    dev = resolve_device(device)
    seed = context.seed if seed is None else int(seed)
    shell = float(shell_mm) if shell_mm is not None else max(6.0, 3.0 * float(max_displacement_mm))
    gen = torch.Generator().manual_seed(seed)
    emb = get_model(model, device=dev, weights=weights, random_weights=random_weights) if isinstance(model, str) else model
    embed = _embed_fn(emb)

    timing = {}
    surf = extract_head_surface(volume, device=dev, target_faces=target_faces)
    timing["surface"] = time.perf_counter() - t0
    verts0 = np.asarray(surf.verts, np.float64)
    normals0 = np.asarray(surf.normals, np.float64)
    w = vertex_face_weight(volume, context.face, verts0, ramp_mm)
    if not (w > 0).any():
        raise DefaceError(f"{volume.name}: no skin inside the face region (adversarial): nothing to move")

    # the pool of views: the render protocol's distributions, our own seed
    protocol = RenderProtocol(views=int(views), image_size=int(image_size), seed=seed + 1)
    params = sample_view_params(protocol, "adversarial")
    params["light_x"], params["light_y"], params["light_z"] = _light_world(
        surf.frame, params["light_azimuth_deg"], params["light_elevation_deg"]).T
    cams, lights, mat = scene_from_params(surf.frame, params, device=dev)
    v0 = torch.as_tensor(verts0, dtype=torch.float32, device=dev)
    n0 = torch.as_tensor(normals0, dtype=torch.float32, device=dev)
    faces_all = torch.as_tensor(np.asarray(surf.faces, np.int64), device=dev)
    faces = faces_all.index_select(0, front_faces(v0, faces_all, cams.centers()))

    def render(verts, sel):
        frags = rasterize(verts, faces, cams[sel], protocol.image_size, backend=backend, device=dev)
        return shade(frags, verts, faces, None, cams[sel], lights[sel], mat[sel], background=protocol.background)

    aligner = FaceAligner(device=dev, crops=(ARCFACE_CROP,) if emb.crop == ARCFACE_CROP else (emb.crop, ARCFACE_CROP))
    all_views = torch.arange(len(cams), device=dev)
    with torch.no_grad():
        images0 = render(v0, all_views)
    al0 = aligner.align(images0.cpu())
    rows = torch.nonzero(al0.found).flatten()
    alignment_source = "mtcnn"
    if len(rows) == 0:
        if emb.crop.alignment != "arcface":
            raise DefaceError(f"{volume.name}: MTCNN finds no face in any render of the original head "
                              "(adversarial); check the surface and its face frame")
        # no face detected (a phantom): the template laid on the face frame stands in for the landmarks
        alignment_source = "face-frame"
        al0 = dataclasses.replace(al0, landmarks=_frame_landmarks(surf.frame, cams, protocol.image_size))
        rows = torch.arange(len(al0))
    pool = rows.to(dev)
    crop = _crop_fn(emb, aligner, al0, rows)
    with torch.no_grad():
        e_orig = embed(crop(images0[pool], torch.arange(len(rows)))).float()
        identity = torch.nn.functional.normalize(e_orig.mean(0), dim=0)
        sim_start = float((e_orig @ identity).mean())

    timing["setup_detect"] = time.perf_counter() - t0 - sum(timing.values())
    smooth = smoothing_operator(surf.faces, len(verts0), dev)
    wt = torch.as_tensor(w, dtype=torch.float32, device=dev)
    p = torch.zeros(len(verts0), device=dev, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    bound = float(max_displacement_mm)

    def displacement(param):
        q = param
        for _ in range(int(smooth_iters)):
            q = torch.sparse.mm(smooth, q[:, None])[:, 0]
        return bound * wt * torch.tanh(q)

    history = []
    for step in range(int(steps)):
        pick = torch.randperm(len(rows), generator=gen)[:int(batch_views)]
        d = displacement(p)
        verts = v0 + d[:, None] * n0
        img = render(verts, pool[pick.to(dev)])
        e = embed(crop(img, pick))
        sim = (e.float() @ identity).mean()
        lap = d - torch.sparse.mm(smooth, d[:, None])[:, 0]
        loss = sim + smooth_weight * (lap ** 2).mean() / max(float(wt.mean()), 1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(round(float(sim.detach()), 4))
        if history[-1] < target_similarity:
            break

    with torch.no_grad():
        d = displacement(p)
        verts_adv = (v0 + d[:, None] * n0)
        img = render(verts_adv, pool)
        sim_final = float((embed(crop(img, torch.arange(len(rows)))).float() @ identity).mean())
    al1 = aligner.align(render(verts_adv, all_views).cpu())
    timing["optimise"] = time.perf_counter() - t0 - sum(timing.values())
    disp = d.cpu().numpy().astype(np.float64)
    out = warp_volume_near_skin(volume, context.face, verts0, normals0, disp, shell_mm=shell)
    timing["write_back"] = time.perf_counter() - t0 - sum(timing.values())

    facts = {
        "model": getattr(emb, "name", str(model)),
        "max_displacement_mm_bound": bound,
        "max_displacement_mm": round(float(np.abs(disp).max()), 3),
        "mean_abs_displacement_mm_face": round(float(np.abs(disp[w > 0]).mean()), 3),
        "vertices_moved": int((np.abs(disp) > 0.05).sum()),
        "views_in_pool": int(len(rows)),
        "landmarks": alignment_source,
        "steps": len(history),
        "similarity_to_identity_start": round(sim_start, 4),
        "similarity_to_identity_end": round(sim_final, 4),
        "similarity_history": history,
        "mtcnn_found_original": f"{int(al0.found.sum())}/{len(al0)}",
        "mtcnn_found_adversarial_mesh": f"{int(al1.found.sum())}/{len(al1)}",
    }
    if verify:
        # the volume's own surface must carry the edit: distance of the re-extracted skin to the optimised one
        from scipy.spatial import cKDTree

        new = extract_head_surface(Volume(out, volume.affine, volume.modality, volume.path), device=dev,
                                   target_faces=target_faces)
        tree = cKDTree(np.asarray(new.verts, np.float64))
        core = w >= 0.99
        moved = core & (np.abs(disp) > 0.5)
        d_adv, _ = tree.query(verts_adv.cpu().numpy()[core])
        d_orig, _ = tree.query(verts0[core])
        facts["verify"] = {
            "reextracted_to_optimised_mm_median": round(float(np.median(d_adv)), 3),
            "reextracted_to_optimised_mm_p95": round(float(np.percentile(d_adv, 95)), 3),
            "reextracted_to_original_mm_median": round(float(np.median(d_orig)), 3),
            "moved_vertices_reextracted_to_optimised_mm_median": (
                round(float(np.median(tree.query(verts_adv.cpu().numpy()[moved])[0])), 3) if moved.any() else None),
            "moved_vertices_reextracted_to_original_mm_median": (
                round(float(np.median(tree.query(verts0[moved])[0])), 3) if moved.any() else None),
        }
        timing["verify"] = time.perf_counter() - t0 - sum(timing.values())
    facts["seconds_by_step"] = {k: round(v, 2) for k, v in timing.items()}
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    if info is not None:
        info.update(facts)
    return out, context.face, facts


register_method("adversarial", adversarial_face,
                description="skin moved (bounded, smooth) along its normals to push the face model's embeddings "
                            "away from the person's identity")
