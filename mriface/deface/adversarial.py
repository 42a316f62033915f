"""The ``adversarial`` defacing method: move the skin a few millimetres so the face model no longer knows the face.

Instead of removing the face, the skin surface inside the face region is
pushed along its normals by a small, smooth displacement field (at most
``max_displacement_mm``) chosen with the differentiable renderer and a face
model's gradients so that each render of the head is no closer to the
original head's renders than a stranger's face would be: rank-aware, as the
study ranks by best match. "A stranger" is measured against impostor
references (by default the two average heads on the index), and each scan
draws its own place among the strangers (:func:`stranger_target`), so that
over a cohort the defaced scans' own ranks spread as chance's. The
objective is the expectation over the render protocol's random views,
lights and skin tones (a pool of views drawn with
:func:`mriface.render.sample_view_params`, a random batch per step), with a
hinge on MTCNN's O-net face logit so that the face stays detectable, and
each round ends with a check of the written-back volume (re-extracted,
rendered under new views, detected and embedded; see :func:`adversarial_face`).

Chain of gradients: displacement (per vertex, along the normal) -> vertices
-> :func:`mriface.render.rasterize` (``embree`` on the CPU, ``zbuffer`` on
CUDA: barycentrics and depth recomputed in torch, differentiable away from
silhouettes) and :func:`mriface.render.shade` (normals recomputed from the
vertices) -> images -> FaceNet's MTCNN box crop (``roi_align``) or the
aligner's similarity warp onto the ArcFace template, with the boxes and
landmarks found once on the initial renders (fixed per view) -> the face
model (``embed_differentiable``, or FaceNet's frozen network).

Bounds: the displacement is ``max_displacement_mm * w * tanh(S p)`` with
``w`` in [0, 1] rising over ``ramp_mm`` inside the face region (0 outside it,
so the edit fades out at the region's border), ``S`` a few steps of
neighbour averaging on the mesh (smooth by construction) and a Laplacian
penalty on top; the face stays a face (MTCNN's detection rate on the final
renders is measured and returned).

Written back to the volume: every voxel of the face region within
``shell_mm`` of the skin takes the intensity found at ``x - u(x)``, where
``u`` is the displacement of the nearest vertices (inverse-distance weighted
over 4) fading as ``1 - (s / shell)^2`` with the distance ``s`` along their
normal: a smooth, invertible warp of the volume near the skin
(``|du/ds| <= 2 max / shell < 1``).
:func:`extract_head_surface` of the result gives the moved skin; the method
re-extracts it and reports the distance to the optimised surface. Brain
voxels are never in the face region and are put back by
:func:`~mriface.deface.core.run_method` in any case.

The geometry (face weights, mesh smoothing, the write-back warp) lives in
:mod:`mriface.deface.skinwarp`. This module is over 500 lines because what
is left is one job: the optimisation loop with its checks and rounds, and
the model-side helpers only it uses (differentiable crops, MTCNN's O-net
logit, the impostor references).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from ..volume import Volume
from .core import DefaceContext, DefaceError, register_method
from .skinwarp import _submesh_smoothing, smoothing_operator, vertex_face_weight, warp_volume_near_skin

__all__ = ["adversarial_face", "vertex_face_weight", "warp_volume_near_skin", "smoothing_operator",
           "DEFAULT_IMPOSTORS", "SAME_FACE_SIMILARITY", "DEFAULT_IMPOSTOR_SIMILARITY", "STRANGER_OFFSET",
           "STRANGER_SD", "render_embed", "stranger_target", "check_similarities"]


def _embed_fn(emb):
    """The face model's differentiable embedding: ``embed_differentiable``, or its torch ``model`` (FaceNet).

    Gradients are wanted for the input only: FaceNet runs the copy its
    ``embed`` runs on the CPU (batch norms folded, channels-last; see
    ``FaceNetEmbedder._runner``) with its parameters frozen, so that the
    backward pass computes no weight gradients (the network's own parameters
    have ``requires_grad`` set, and computing their gradients roughly doubled
    the backward pass).
    """
    if hasattr(emb, "embed_differentiable"):
        return emb.embed_differentiable
    net = getattr(emb, "model", None)
    if isinstance(net, torch.nn.Module):  # FaceNet: the InceptionResnetV1 that embed() runs (eval mode)
        layout = torch.contiguous_format
        if hasattr(emb, "_runner"):
            net, layout = emb._runner()
        if any(p.requires_grad for p in net.parameters()):
            net = copy.deepcopy(net).requires_grad_(False) if net is getattr(emb, "model", None) \
                else net.requires_grad_(False)  # the runner is embed()'s private copy: freezing it changes nothing else

        def run(crops):
            x = crops.to(emb.device, getattr(emb, "dtype", torch.float32)).contiguous(memory_format=layout)
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


#: Default impostor references: the two population-average heads that ship on the index
#: (pydeface 2.1.0's and voxface's ConteCore2), sample keys of :func:`mriface.datasets.fetch`.
DEFAULT_IMPOSTORS = ("pydeface", "voxface")
#: An impostor reference whose renders match the scan's own original renders this closely
#: (mean best-match cosine) is the same face (the scan *is* that average head): it is left out.
SAME_FACE_SIMILARITY = 0.9
#: The goal when no impostor reference is usable (no face found in its renders): cosine to own renders.
DEFAULT_IMPOSTOR_SIMILARITY = 0.3

#: How far below the impostor references' similarity a stranger's lies, on the check's scale (cosine;
#: FaceNet). The average heads resemble everyone a little, and more so the edited face: on 16 held-out
#: participants of the synthetic cohort (syn044-syn060), defaced with this method and scored by the
#: scan-to-scan study against 41 originals, the own-minus-strangers score sat 0.120 above the check's gap
#: (s.e. 0.011). ``python -m benchmarks.calibrate_stranger`` measures it (docs/deidentification.md).
STRANGER_OFFSET = 0.12
#: The spread of a participant's study scores across strangers (the same calibration: 0.074).
STRANGER_SD = 0.075

_IMPOSTOR_CACHE: dict = {}


def render_embed(surface, emb, embed, *, views: int, size: int, seed: int, backend: str, device,
                 crops=None):
    """Render a surface under random views, find the faces and embed them.

    Parameters
    ----------
    surface : HeadSurface
        Rendered under ``RenderProtocol(views, size, seed)``: cameras in the head's own face frame.
    emb, embed
        The face model and its embedding function ((B, 3, S, S) crops -> (B, D)).
    crops : tuple of CropSpec, optional
        Crops the aligner makes (default: the model's own).

    Returns
    -------
    prob : np.ndarray, (V,)
        MTCNN's face probability per render (0 where it found none).
    found : np.ndarray of bool, (V,)
    e : torch.Tensor, (V, D) or None
        Unit embeddings of the renders with a face (zero rows elsewhere), on ``device``; None without any.
    """
    from ..recognition import FaceAligner
    from ..render import RenderProtocol, render_views

    prot = RenderProtocol(views=int(views), image_size=int(size), seed=int(seed))
    with torch.no_grad():
        imgs = render_views({"head": surface}, prot, backend=backend, device=device).images
    al = FaceAligner(device=device, crops=tuple(crops or (emb.crop,))).align(imgs.cpu())
    found = np.asarray(al.found, bool)
    prob = np.nan_to_num(np.asarray(al.prob, float))
    e = None
    if found.any():
        with torch.no_grad():
            got = torch.nn.functional.normalize(
                embed(al.crop_for(emb.crop)[torch.as_tensor(found)].to(device)).float(), dim=1)
        e = torch.zeros((len(found), got.shape[1]), device=got.device)
        e[torch.as_tensor(found, device=got.device)] = got
    return prob, found, e


def _impostor_embeddings(key, emb, embed, *, views: int, size: int, seed: int, backend: str, device) -> torch.Tensor:
    """(K, D) embeddings of renders of an impostor head (a sample key or a Volume) under random views.

    The renders do not depend on the scan being defaced (cameras are placed in each head's own
    face frame), so they are computed once per process for a sample key, face model and protocol.
    """
    from .. import datasets
    from ..surface import extract_head_surface
    from ..volume import load_volume

    ident = (key, getattr(emb, "name", None), json_id(emb), int(views), int(size), int(seed), backend, str(device)) \
        if isinstance(key, str) else None
    if ident is not None and ident in _IMPOSTOR_CACHE:
        return _IMPOSTOR_CACHE[ident]
    vol = load_volume(datasets.fetch(key)) if isinstance(key, str) else key
    surf = extract_head_surface(vol, device=device)
    _, found, e = render_embed(surf, emb, embed, views=views, size=size, seed=seed, backend=backend, device=device)
    e = e[torch.as_tensor(found, device=e.device)] if e is not None else torch.zeros((0, 1))
    if ident is not None:
        if len(_IMPOSTOR_CACHE) > 16:
            _IMPOSTOR_CACHE.clear()
        _IMPOSTOR_CACHE[ident] = e
    return e


def check_similarities(e, found, e_orig, orig_found, e_imp) -> "tuple[float, float]":
    """Score a defaced head's check renders as a study scores a probe: (own, impostor) similarity.

    Parameters
    ----------
    e : torch.Tensor, (V, D)
        Unit embeddings of the defaced head's renders under V views (rows of views without a face unused).
    found : array of bool, (V,)
    e_orig : torch.Tensor, (V, D) or None
        The original head's renders under the *same* V views.
    orig_found : array of bool, (V,)
    e_imp : torch.Tensor, (K, D) or None
        The impostor references' renders (none: :data:`DEFAULT_IMPOSTOR_SIMILARITY`).

    Returns
    -------
    own : float
        Mean over the views with a face of the best cosine to the original's renders of the
        *other* views (leave-one-out: a gallery never holds the probe's own view).
    impostor : float
        Mean over the same views of the best cosine to the impostor references.
        Both NaN without a face in the defaced renders or in two of the original's.
    """
    dev = e.device if e is not None else "cpu"
    found = torch.as_tensor(np.asarray(found, bool), device=dev)
    o_found = torch.as_tensor(np.asarray(orig_found, bool), device=dev)
    if e is None or e_orig is None or not bool(found.any()) or int(o_found.sum()) < 2:
        return float("nan"), float("nan")
    ok = o_found[None, :] & ~torch.eye(len(found), dtype=torch.bool, device=dev)
    own = (e @ e_orig.T).masked_fill(~ok, -1.0).max(1).values[found]
    if e_imp is None or len(e_imp) == 0:
        return float(own.mean()), DEFAULT_IMPOSTOR_SIMILARITY
    return float(own.mean()), float((e[found] @ e_imp.T).max(1).values.mean())


def stranger_target(seed: int, scan: "bytes | str" = b"", offset: float = STRANGER_OFFSET,
                    sd: float = STRANGER_SD) -> "tuple[float, float]":
    """The goal for the check's similarity gap (own minus impostor references'): a stranger's.

    A stranger's similarity to a probe is not one number: across a gallery it
    spreads by ``sd`` around ``offset`` below the impostor references'. A
    defaced scan whose own similarity always sat at the strangers' mean
    would rank mid-gallery every time, which is not chance either; so each
    scan draws its own place in that spread (``z``, standard normal cut at
    +-2, from ``seed`` and the scan: the same scan and seed give the same
    draw, different scans different ones), and over a cohort the own ranks
    spread like a stranger's.

    Parameters
    ----------
    seed : int
    scan : bytes-like or str
        What tells the scan apart (:func:`adversarial_face` passes its voxels, a C-contiguous array:
        hashed in place, not copied).
    offset, sd : float
        See :data:`STRANGER_OFFSET`, :data:`STRANGER_SD`.

    Returns
    -------
    target : float
        ``-offset + sd * z`` (cosine).
    z : float
    """
    import hashlib

    digest = hashlib.sha256(scan.encode() if isinstance(scan, str) else memoryview(scan)).digest()
    rng = np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])
    z = float(np.clip(rng.standard_normal(), -2.0, 2.0))
    return -float(offset) + float(sd) * z, z


def json_id(emb) -> str:
    """A stable text id of a face model (its ``model_id()`` when it has one)."""
    import json

    mid = getattr(emb, "model_id", None)
    try:
        return json.dumps(mid() if callable(mid) else mid, sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 - an id that cannot be written is only a cache miss
        return repr(id(emb))


def _onet_logit(aligner, boxes: torch.Tensor):
    """A differentiable MTCNN final-stage (O-net) face logit for (B, H, W, 3) [0, 1] images at fixed boxes.

    MTCNN's last stage scores a 48 x 48 crop of the squared candidate box;
    here the box is the one found on the original render (squared as
    MTCNN does), so the logit says whether that stage still sees a face
    where the face was. ``log p(face) - log p(not face)``; p >= 0.95 is a logit >= 2.94.
    """
    from torchvision.ops import roi_align

    onet = aligner._mtcnn.onet.requires_grad_(False)  # the caller's own aligner: gradients for the image only
    b = boxes.to(torch.float32)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = torch.maximum(w, h)
    x0, y0 = b[:, 0] + w / 2 - side / 2, b[:, 1] + h / 2 - side / 2

    def logit(images, sel):
        x = images.permute(0, 3, 1, 2) * 255.0
        rois = torch.stack([torch.arange(len(sel), dtype=x.dtype, device=x.device), x0[sel].to(x.device),
                            y0[sel].to(x.device), (x0 + side)[sel].to(x.device), (y0 + side)[sel].to(x.device)], 1)
        crops = roi_align(x, rois, output_size=(48, 48), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        prob = onet((crops - 127.5) * 0.0078125)[2]
        return torch.log(prob[:, 1].clamp_min(1e-12)) - torch.log(prob[:, 0].clamp_min(1e-12))
    return logit


def adversarial_face(volume: Volume, context: DefaceContext, *, max_displacement_mm: float = 4.0,
                     model: "str | object" = "facenet", weights=None, random_weights: bool = False,
                     steps: int = 8, rounds: int = 3, impostors=DEFAULT_IMPOSTORS, impostor_views: int = 10,
                     target_gap: "float | None" = None, stranger_offset: float = STRANGER_OFFSET,
                     stranger_sd: float = STRANGER_SD, tolerance: float = 0.03,
                     views: int = 8, batch_views: int = 4, image_size: int = 192, lr: float = 0.3,
                     smooth_iters: int = 10, smooth_weight: float = 2.0, ramp_mm: float = 8.0,
                     detect_weight: float = 0.2, face_logit: float = 4.6, shell_mm: "float | None" = None,
                     seed: "int | None" = None, device="auto", backend: str = "auto",
                     check_views: int = 16, check_size: int = 512, min_detect: float = 0.95,
                     check_prob: float = 0.99, max_backoffs: int = 3,
                     target_faces: "int | None" = None, verify: bool = True, info: "dict | None" = None):
    """Move the face's skin by at most ``max_displacement_mm`` so that the face model takes it for someone else.

    The objective, per render of a random view, is a gap between two
    cosine similarities of its embedding: to the best-matching render of the
    original head (other views of the pool: what a gallery holding the
    original scan offers the study's "max over the subject's renders" score)
    and to the best-matching render of an *impostor reference* (other faces:
    by default the two population-average heads on the index, rendered under
    random views; one that is the scan's own face, such as the average head
    defaced itself, is left out). The goal for the gap (own minus impostor)
    is a *stranger's*: the average heads resemble everyone a little, so a
    stranger's similarity lies ``stranger_offset`` below theirs, spread by
    ``stranger_sd``, and each scan draws its place in that spread
    (:func:`stranger_target`). Pushing only the own similarity down moved
    the renders away from every face alike, and the defaced scan still
    ranked first; pushing it below the impostors' by a fixed margin left a
    scan's rank wherever the average heads happened to resemble it (not
    chance); overshooting ranks it last, which names it as well. So two
    hinges hold the gap in a band: every render at most the goal, their
    mean at least ``2 * tolerance`` below it. A third hinge keeps
    MTCNN's final stage (O-net) confident of a face in the box where it found
    one on the original render, and a smoothness penalty keeps the field
    smooth. Each round of ``steps`` Adam steps is followed by a check of the
    *written-back volume*: its surface is re-extracted (as any study does),
    rendered under ``check_views`` new views (seed + 2, ``check_size`` px)
    and run through MTCNN and the face model. If MTCNN finds a face with
    p >= ``check_prob`` (0.99) in fewer than ``min_detect`` of them (and in
    fewer than in the original's renders under the same views), the
    displacement is scaled back (x 0.7, at most ``max_backoffs`` times), the detection hinge's
    weight doubles, and the next round optimises on at the smaller scale.
    The check measures the gap as a study would: each check render's best
    cosine to the original head's renders under the same check views (the
    other views': leave-one-out) minus its best cosine to the impostor
    references' renders at the check's size. While that gap is more than
    ``tolerance`` from the target, the next round (``rounds`` at most) moves
    the optimisation's goal by the difference: the pool's renders (192 px)
    and the check's (512 px, of the written-back volume) do not score alike.

    Parameters
    ----------
    max_displacement_mm : float
        Largest displacement of the skin along its normal (mm); exact for the
        optimised mesh (``tanh`` times a weight <= 1).
    model : str or Embedder
        The face model whose gradients steer the edit (needs
        ``embed_differentiable`` or a torch ``model``): ``"facenet"`` (default,
        the study's model), ``"arcface-mbf"`` or ``"sface"``.
    weights, random_weights
        Passed to :func:`mriface.recognition.get_model` for a model name.
    steps : int
        Adam steps per round (a round ends early once every render of a step is below the goal).
    rounds : int
        Rounds of optimisation, each followed by the check of the written-back volume.
    impostors : sequence
        Impostor references: sample keys (:func:`mriface.datasets.fetch`) or
        Volumes (default :data:`DEFAULT_IMPOSTORS`). A reference whose renders
        match the original's by :data:`SAME_FACE_SIMILARITY` or more is left
        out. Without a usable one, the own similarity is pushed below
        :data:`DEFAULT_IMPOSTOR_SIMILARITY`.
    impostor_views : int
        Renders per impostor reference (seed + 3; computed once per process).
    target_gap : float, optional
        A fixed goal for the check's gap (cosine, own minus impostor) instead of
        the drawn stranger's (:func:`stranger_target`).
    stranger_offset, stranger_sd : float
        How far below the impostor references' similarity a stranger's lies, and
        its spread (defaults :data:`STRANGER_OFFSET`, :data:`STRANGER_SD`: FaceNet,
        measured on held-out synthetic participants defaced with this method; another
        model needs its own, ``benchmarks/calibrate_stranger.py``).
    tolerance : float
        The check accepts a gap within this of the target (cosine).
    views, batch_views, image_size
        Pool of random views (the render protocol's ranges, seed + 1; views
        where MTCNN finds no face on the original are dropped), views per
        step, render side in pixels.
    lr : float
        Adam's step on the unbounded parameters.
    smooth_iters, smooth_weight, ramp_mm
        Neighbour-averaging steps applied to the parameters; weight of the
        Laplacian penalty; the displacement fades in over ``ramp_mm`` inside
        the face region.
    detect_weight, face_logit
        Weight of the detection hinge and the O-net logit it keeps (4.6: p = 0.99).
    shell_mm : float, optional
        Thickness of the warped layer on each side of the skin (default
        ``3 * max_displacement_mm``, at least 6 mm).
    seed : int, optional
        Default: the context's seed.
    device : str or torch.device
        Where rendering and the face model run ('auto' = CUDA when present).
    backend : str
        Rasterizer with vertex gradients ('auto': zbuffer on CUDA, embree on the CPU).
    check_views, check_size, min_detect, check_prob
        The check of the written-back volume (0 views: no check). The
        displacement is scaled back (x 0.7) while MTCNN finds a face with
        p >= ``check_prob`` in fewer than ``min_detect`` of its renders, and
        fewer than in the same views of the original head (a head that is
        itself missed in some views is not held to more). 0.99 rather than the 0.95 a study counts: the 16 check
        views are a sample, and a defaced head whose check renders all had
        p >= 0.95 (some only 0.975) still lost 3 of 10 other views at 0.95;
        the renders the check passes at 0.99 keep a margin for views it does
        not see (docs/deidentification.md).
    max_backoffs : int
        Scale-backs at most (each also doubles ``detect_weight`` for the rounds after it).
    target_faces : int, optional
        Decimate the skin mesh that is optimised to about this many triangles.
    verify : bool
        Report the distance of the written-back volume's re-extracted skin to the optimised one.
    info : dict, optional
        Filled with what happened (also in :attr:`DefaceResult.info`).
    """
    from .._device import resolve_device
    from ..recognition import ARCFACE_CROP, FaceAligner, get_model
    from ..render import RenderProtocol, front_faces, rasterize, sample_view_params, scene_from_params, shade
    from ..render.protocol import _light_world
    from ..render.rasterize import resolve_backend
    from ..surface import extract_head_surface

    t0, c0 = time.perf_counter(), time.process_time()
    cpu = {}

    def lap_cpu(name):  # CPU seconds of this process per stage: the figure that a loaded machine does not inflate
        cpu[name] = time.process_time() - c0 - sum(cpu.values())

    if not context.face.any():
        raise DefaceError(f"{volume.name}: the face region is empty on this scan's grid (adversarial); "
                          "is the face inside the field of view?")
    if not max_displacement_mm > 0:
        raise DefaceError(f"adversarial: max_displacement_mm={max_displacement_mm}: give a positive bound (mm)")
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    seed = context.seed if seed is None else int(seed)
    shell = float(shell_mm) if shell_mm is not None else max(6.0, 3.0 * float(max_displacement_mm))
    gen = torch.Generator().manual_seed(seed)
    emb = get_model(model, device=dev, weights=weights, random_weights=random_weights) \
        if isinstance(model, str) else model
    embed = _embed_fn(emb)
    model_name = getattr(emb, "name", str(model))
    if target_gap is None:
        target, z = stranger_target(seed, np.ascontiguousarray(volume.data), stranger_offset, stranger_sd)
    else:
        target, z = float(target_gap), None
    tol = float(tolerance)

    timing = {}
    surf = extract_head_surface(volume, device=dev, target_faces=target_faces)
    timing["surface"] = time.perf_counter() - t0
    lap_cpu("surface")
    verts0 = np.asarray(surf.verts, np.float64)
    normals0 = np.asarray(surf.normals, np.float64)
    w = vertex_face_weight(volume, context.face, verts0, ramp_mm)
    active = np.flatnonzero(w > 0)
    if not len(active):
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
    # only the face's neighbourhood is rendered while optimising: the crops the models see lie within it
    centre = torch.as_tensor(np.asarray(surf.frame.center), dtype=torch.float32, device=dev)
    reach = float(np.linalg.norm(verts0[active] - np.asarray(surf.frame.center), axis=1).max()) + 30.0
    mid = v0.index_select(0, faces.flatten()).reshape(-1, 3, 3).mean(1)
    faces = faces[torch.linalg.norm(mid - centre, dim=1) <= reach]

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
    onet = _onet_logit(aligner, al0.boxes[rows]) if alignment_source == "mtcnn" and detect_weight > 0 else None
    with torch.no_grad():
        e_orig = torch.nn.functional.normalize(embed(crop(images0[pool], torch.arange(len(rows)))).float(), dim=1)
    n_pool = len(rows)
    # leave-one-out: a view is compared with the original's *other* views, as a probe with a gallery
    others = ~torch.eye(n_pool, dtype=torch.bool, device=e_orig.device) if n_pool > 1 else \
        torch.ones(1, 1, dtype=torch.bool, device=e_orig.device)

    def best_match(e, sel):
        """(B,) soft maximum (temperature 1/20) of each render's cosine to the original's other views."""
        s = (e.float() @ e_orig.T).masked_fill(~others[sel.to(e_orig.device)], -1.0)
        return torch.logsumexp(20.0 * s, dim=1) / 20.0

    def hard_match(e, sel):
        s = (e.float() @ e_orig.T).masked_fill(~others[sel.to(e_orig.device)], -1.0)
        return s.max(1).values

    with torch.no_grad():
        sim_start = float(hard_match(e_orig, torch.arange(n_pool)).mean())
    # impostor references: other faces' renders; the defaced renders must match one of them better than their own
    refs, dropped = [], []
    for key in (impostors or ()):
        e_imp = _impostor_embeddings(key, emb, embed, views=impostor_views, size=image_size, seed=seed + 3,
                                     backend=backend, device=dev)
        if len(e_imp) == 0:
            continue
        same = float((e_orig @ e_imp.to(e_orig.device).T).max(1).values.mean())
        name = key if isinstance(key, str) else getattr(key, "name", "volume")
        (dropped if same >= SAME_FACE_SIMILARITY else refs).append((name, e_imp.to(e_orig.device), round(same, 4),
                                                                    key))
    e_imp = torch.cat([r[1] for r in refs]) if refs else None
    imp_start = max((r[2] for r in refs), default=float("nan"))

    def impostor_match(e, soft=True):
        """(B,) each render's (soft) best cosine to the impostor references (a constant without any)."""
        if e_imp is None:
            return torch.full((len(e),), DEFAULT_IMPOSTOR_SIMILARITY, device=e.device)
        s = e.float() @ e_imp.T
        return torch.logsumexp(20.0 * s, dim=1) / 20.0 if soft else s.max(1).values
    timing["setup_detect"] = time.perf_counter() - t0 - sum(timing.values())
    lap_cpu("setup_detect")

    smooth, local = _submesh_smoothing(np.asarray(surf.faces), active, dev)
    act = torch.as_tensor(active, device=dev)
    wt = torch.as_tensor(w[active], dtype=torch.float32, device=dev)
    p = torch.zeros(len(active), device=dev, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    bound = float(max_displacement_mm)
    scale = 1.0

    def displacement(param):
        q = param
        for _ in range(int(smooth_iters)):
            q = torch.sparse.mm(smooth, q[:, None])[:, 0]
        return scale * bound * wt * torch.tanh(q)

    def full(d_act):
        return torch.zeros(len(verts0), device=dev, dtype=d_act.dtype).index_put((act,), d_act)

    def check_renders(surface):
        """The check's renders of a surface (``check_views`` new views, seed + 2): prob, found, embeddings."""
        return render_embed(surface, emb, embed, views=check_views, size=check_size, seed=seed + 2,
                            backend=backend, device=dev, crops=aligner.crops)

    reference = {}  # the original head's check renders and the impostors' at the check's size, made once

    def check_reference():
        if not reference:
            c = time.process_time()
            prob, found, e = check_renders(surf)  # the same extraction (and decimation) as the checks of the edit
            reference.update(prob=prob, found=found, e=e, share=float((prob >= float(check_prob)).mean()),
                             cpu_s=round(time.process_time() - c, 2))
            reference["impostors"] = torch.cat([
                _impostor_embeddings(r[3], emb, embed, views=impostor_views, size=check_size, seed=seed + 3,
                                     backend=backend, device=dev).to(dev) for r in refs]) if refs else None
        return reference

    def detect_floor() -> float:
        """The share of check renders that must hold a face: ``min_detect``, or the original's own share."""
        return min(float(min_detect), check_reference()["share"])

    def check(disp):
        """Write back, re-extract, render new views, detect and embed: (volume, surface, facts)."""
        c1 = time.process_time()
        out = warp_volume_near_skin(volume, context.face, verts0, normals0, disp, shell_mm=shell)
        c2 = time.process_time()
        new = extract_head_surface(Volume(out, volume.affine, volume.modality, volume.path), device=dev,
                                   target_faces=target_faces)
        facts = {}
        if check_views > 0:
            prob, hit, e = check_renders(new)
            n_face = int((prob >= float(check_prob)).sum())
            ref = check_reference()
            sim, imp = check_similarities(e, hit, ref["e"], ref["found"], ref["impostors"])
            facts = {"views": int(check_views), "size": int(check_size),
                     "mtcnn_p95": f"{int((prob >= 0.95).sum())}/{len(hit)}",
                     f"mtcnn_p{round(100 * float(check_prob))}": f"{n_face}/{len(hit)}",
                     "mtcnn_prob": [round(float(x), 3) for x in prob],
                     "face_share": n_face / max(len(hit), 1), "similarity": round(sim, 4),
                     "impostor_similarity": round(imp, 4), "gap": round(sim - imp, 4)}
        facts["cpu_s"] = {"write_back": round(c2 - c1, 2),
                          "surface_render_detect_embed": round(time.process_time() - c2, 2)}
        return out, new, facts

    history, checks = [], []
    out = new_surface = None
    detect_w, backoff = float(detect_weight), 0
    goal = target  # the optimisation's goal for the pool's gap; the checks move it towards the check's target
    for rnd in range(max(1, int(rounds))):
        for step in range(int(steps)):
            pick = torch.randperm(n_pool, generator=gen)[:int(batch_views)]
            d = displacement(p)
            verts = v0 + full(d)[:, None] * n0
            img = render(verts, pool[pick.to(dev)])
            e = torch.nn.functional.normalize(embed(crop(img, pick)).float(), dim=1)
            gap = best_match(e, pick) - impostor_match(e)  # own minus impostor, per render
            # a band: every render at most the goal, and their mean not past it by more than 2 tolerances
            loss = torch.relu(gap - goal).mean() + torch.relu(goal - 2.0 * tol - gap.mean())
            if onet is not None:
                loss = loss + detect_w * torch.relu(face_logit - onet(img, pick)).mean()
            lap = d - torch.sparse.mm(smooth, d[:, None])[:, 0]
            loss = loss + smooth_weight * (lap ** 2).mean() / max(float(wt.mean()), 1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(round(float((hard_match(e.detach(), pick) - impostor_match(e.detach(), False)).mean()), 4))
            g = gap.detach()
            if float(g.max()) < goal and float(g.mean()) > goal - 2.0 * tol:
                break
        with torch.no_grad():
            disp = full(displacement(p)).cpu().numpy().astype(np.float64)
        out, new_surface, facts = check(disp)
        facts.update(round=rnd, steps=len(history), scale=round(scale, 3), goal=round(goal, 4))
        checks.append(facts)
        # the face must stay a face (where MTCNN found one on the original: not on a phantom)
        while facts and alignment_source == "mtcnn" and facts["face_share"] < min_detect \
                and backoff < int(max_backoffs) and facts["face_share"] < detect_floor():
            scale *= 0.7
            backoff += 1
            detect_w *= 2.0  # the rounds after a scale-back hold the detection hinge harder
            with torch.no_grad():
                disp = full(displacement(p)).cpu().numpy().astype(np.float64)
            out, new_surface, facts = check(disp)
            facts.update(round=rnd, steps=len(history), scale=round(scale, 3), goal=round(goal, 4))
            checks.append(facts)
        err = facts.get("gap", float("nan")) - target
        if not np.isfinite(err) or abs(err) <= tol:  # NaN: no face on the check renders, or a phantom
            break
        # the written-back volume is off the target (kept too little of the edit, or overshot): move the goal
        goal = float(np.clip(goal - err, -1.0, 0.5))
    timing["optimise_check"] = time.perf_counter() - t0 - sum(timing.values())
    lap_cpu("optimise_check")

    with torch.no_grad():
        d = displacement(p)
        verts_adv = (v0 + full(d)[:, None] * n0)
        img = render(verts_adv, pool)
        e_end = torch.nn.functional.normalize(embed(crop(img, torch.arange(n_pool))).float(), dim=1)
        sim_final = float(hard_match(e_end, torch.arange(n_pool)).mean())
    facts = {
        "model": model_name,
        "max_displacement_mm_bound": bound,
        "max_displacement_mm": round(float(np.abs(disp).max()), 3),
        "mean_abs_displacement_mm_face": round(float(np.abs(disp[w > 0]).mean()), 3),
        "vertices_moved": int((np.abs(disp) > 0.05).sum()),
        "views_in_pool": int(n_pool),
        "landmarks": alignment_source,
        "impostors": [{"name": r[0], "similarity_to_original": r[2]} for r in refs],
        "impostors_left_out_same_face": [{"name": r[0], "similarity_to_original": r[2]} for r in dropped],
        "impostor_similarity_start": round(imp_start, 4),
        "target_gap": round(target, 4),
        "stranger_z": None if z is None else round(z, 4),
        "target_met": bool(checks and abs(checks[-1].get("gap", float("nan")) - target) <= tol),
        "steps": len(history),
        "rounds": len({c.get("round") for c in checks}) if checks else 0,
        "similarity_to_identity_start": round(sim_start, 4),
        "similarity_to_identity_end": round(sim_final, 4),
        "similarity_history": history,
        "mtcnn_found_original": f"{int(al0.found.sum())}/{len(al0)}",
        "scale_backs": backoff,
        "original_check_face_share": round(reference["share"], 4) if reference else None,
        "original_check_cpu_s": reference.get("cpu_s"),
        "check": checks[-1] if checks else {},
        "checks": checks,
    }
    if verify:
        # the volume's own surface must carry the edit: distance of the re-extracted skin to the optimised one
        from scipy.spatial import cKDTree

        tree = cKDTree(np.asarray(new_surface.verts, np.float64))
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
        lap_cpu("verify")
    facts["seconds_by_step"] = {k: round(v, 2) for k, v in timing.items()}
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    facts["cpu_seconds_by_step"] = {k: round(v, 2) for k, v in cpu.items()}
    facts["cpu_seconds"] = round(time.process_time() - c0, 2)
    if info is not None:
        info.update(facts)
    return out, context.face, facts


register_method("adversarial", adversarial_face,
                description="skin moved (bounded, smooth) along its normals to push the face model's embeddings "
                            "away from the person's identity")
