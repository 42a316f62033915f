"""The one shader every backend feeds: fragments -> sRGB images, in torch.

Per covered pixel: interpolate position and smooth normal from the hit
triangle's vertices, then Lambert diffuse + ambient on the skin albedo, plus
a Blinn-Phong highlight tinted by the light; finally an sRGB-like gamma, as a
camera would encode it. Only covered pixels are shaded (gathered, then
scattered back onto the background), which keeps CPU shading cheap.
"""

from __future__ import annotations

import torch

from .cameras import Cameras
from .lights import Lights, Material
from .fragments import Fragments, Hits, fragments_to_hits

__all__ = ["shade", "shade_hits", "shade_points", "image_table", "compose", "vertex_normals_torch"]

_GAMMA = 1.0 / 2.2


def vertex_normals_torch(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (V, 3) of a mesh, in torch, differentiable w.r.t. ``verts``.

    The numpy twin for files and surfaces is :func:`mriface.surface.vertex_normals_np`.

    ``faces`` (F, 3) int64 counter-clockwise from outside, so normals point out.
    """
    tri = verts[faces]
    fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # length = 2 * area
    vn = torch.zeros_like(verts).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-12)


def shade(
    fragments: "Fragments | Hits",
    verts: torch.Tensor,
    faces: torch.Tensor,
    normals: "torch.Tensor | None",
    cameras: Cameras,
    lights: Lights,
    material: Material,
    *,
    background=(0.8, 0.8, 0.8),
) -> torch.Tensor:
    """Colour every pixel.

    Parameters
    ----------
    fragments : Fragments or Hits
        N images of side S, as full-size fragments (``pix_to_face`` indexes
        ``faces``) or as the covered pixels only (a backend's hits, shaded
        without building full-size fragments; the same images either way).
    verts : torch.Tensor
        (V, 3) world RAS+ mm (the concatenated vertices when several meshes
        were rasterized together, see :func:`~mriface.render.concat_meshes`).
    faces : torch.Tensor
        (F, 3) int64.
    normals : torch.Tensor or None
        (V, 3) unit vertex normals; None recomputes them from ``verts`` in
        torch (use that when differentiating w.r.t. vertex positions).
    cameras : Cameras
        The N cameras used to rasterize (for the view direction).
    lights : Lights
        N directional + ambient lights (linear RGB).
    material : Material
        N skin materials (linear RGB albedo).
    background : sequence of 3 floats or torch.Tensor
        sRGB colour in [0, 1] of uncovered pixels: (3,) or (N, 3).

    Returns
    -------
    torch.Tensor
        (N, S, S, 3) sRGB in [0, 1], dtype of ``verts`` (float32 normally), on the fragments' device;
        differentiable w.r.t. verts, normals, lights and material.
    """
    hits = fragments if isinstance(fragments, Hits) else fragments_to_hits(fragments)
    return shade_hits(hits.pixel, hits.face, hits.bary, hits.n_images, hits.image_size, verts, faces, normals,
                      cameras, lights, material, background=background)


def shade_hits(
    pixel: torch.Tensor,
    face: torch.Tensor,
    bary: torch.Tensor,
    n_images: int,
    image_size: int,
    verts: torch.Tensor,
    faces: torch.Tensor,
    normals: "torch.Tensor | None",
    cameras: Cameras,
    lights: Lights,
    material: Material,
    *,
    background=(0.8, 0.8, 0.8),
) -> torch.Tensor:
    """Colour the covered pixels given as compact lists; the rest get the background.

    The core of :func:`shade` (which gathers these lists from its
    fragments, or takes them from a backend's :class:`~mriface.render.Hits`).
    Same result as :func:`shade` on the equivalent fragments.

    Parameters
    ----------
    pixel : torch.Tensor
        (M,) int64 flat pixel index ``image * S * S + row * S + col`` of each covered pixel, no repeats.
    face : torch.Tensor
        (M,) int64 visible row of ``faces`` there.
    bary : torch.Tensor
        (M, 3) barycentric weights of that triangle's vertices.
    n_images, image_size : int
        N and S of the output.
    verts, faces, normals, cameras, lights, material, background
        As for :func:`shade`.

    Returns
    -------
    torch.Tensor
        (N, S, S, 3) sRGB in [0, 1], as :func:`shade`.
    """
    dev = pixel.device
    n, s = int(n_images), int(image_size)
    faces = faces.to(dev)
    verts = verts.to(dev)
    dt = verts.dtype if verts.is_floating_point() else torch.float32
    if normals is None:
        normals = vertex_normals_torch(verts, faces)
    normals = normals.to(dev, dt)
    table = image_table(cameras, lights, material, dev, dt)
    view = torch.div(pixel, s * s, rounding_mode="floor")
    srgb = shade_points(face, bary, view, verts, faces, normals, table)
    return compose(pixel, srgb, n, s, background)


def image_table(cameras: Cameras, lights: Lights, material: Material, device, dtype) -> torch.Tensor:
    """(N, 17) everything the shader needs that is constant per image, one row per image.

    Columns: camera centre (3, mm), unit direction towards the light (3),
    light colour (3), ambient colour (3), albedo (3), specular, shininess.
    """
    return torch.cat([
        cameras.centers().to(device, dtype),
        _unit(lights.direction.to(device, dtype)),
        lights.color.to(device, dtype),
        lights.ambient.to(device, dtype),
        material.albedo.to(device, dtype),
        material.specular.to(device, dtype)[:, None],
        material.shininess.to(device, dtype)[:, None],
    ], dim=1)


def shade_points(face: torch.Tensor, bary: torch.Tensor, view: torch.Tensor, verts: torch.Tensor,
                 faces: torch.Tensor, normals: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(M, 3) sRGB colour of M visible surface points: the lighting model itself.

    Parameters
    ----------
    face : (M,) int64 rows of ``faces``; bary : (M, 3) weights of their vertices;
    view : (M,) int64 image of each point (row of ``table``);
    verts : (V, 3) world mm; faces : (F, 3) int64; normals : (V, 3) unit vertex normals;
    table : (N, 17) from :func:`image_table`. All on one device, float tensors of one dtype.

    Every operation is per point, so shading any split of the points gives the same colours.
    """
    m = face.shape[0]
    dt = table.dtype
    tri = faces.index_select(0, face).reshape(-1)  # (3M,)
    w = bary.to(dt)  # (M, 3)
    pos = _interpolate(w, verts.index_select(0, tri).reshape(m, 3, 3))
    nrm = _unit(_interpolate(w, normals.index_select(0, tri).reshape(m, 3, 3)))

    # the per-image constants, gathered once per point
    per = table.index_select(0, view)
    eye, light_dir, col, amb, albedo = (per[:, 3 * k:3 * k + 3] for k in range(5))
    specular, shininess = per[:, 15], per[:, 16]

    to_eye = _unit(eye - pos)
    n_dot_l = (nrm * light_dir).sum(-1)
    diffuse = n_dot_l.clamp(min=0)
    n_dot_h = (nrm * _unit(light_dir + to_eye)).sum(-1).clamp(min=1e-6)
    spec = torch.where(n_dot_l > 0, _pow(n_dot_h, shininess), 0.0) * specular
    linear = albedo * (amb + col * diffuse[:, None]) + col * spec[:, None]
    return _pow(linear.clamp(1e-6, 1.0), _GAMMA)


def compose(pixel: torch.Tensor, srgb: torch.Tensor, n_images: int, image_size: int, background) -> torch.Tensor:
    """(N, S, S, 3) images: ``srgb`` (M, 3) at the flat pixels ``pixel`` (M,), the background elsewhere.

    ``background``: sRGB (3,) or (N, 3), as for :func:`shade`.
    """
    n, s = int(n_images), int(image_size)
    dev, dt = srgb.device, srgb.dtype
    bg = torch.as_tensor(background, dtype=dt, device=dev)
    bg = bg.expand(n, 3) if bg.dim() == 1 else bg.to(dt)
    if srgb.requires_grad or bg.requires_grad:
        image = bg.repeat_interleave(s * s, dim=0)  # (N*S*S, 3), a fresh tensor
        image = image.index_copy(0, pixel, srgb)
    else:
        # no autograd: fill the background and write the covered pixels in place (one pass each)
        image = torch.empty((n, s * s, 3), dtype=dt, device=dev)
        image.copy_(bg[:, None, :].expand(n, s * s, 3))
        image = image.view(n * s * s, 3).index_copy_(0, pixel, srgb)
    return image.reshape(n, s, s, 3)


def _interpolate(w: torch.Tensor, corner: torch.Tensor) -> torch.Tensor:
    """(M, C) barycentric blend of per-corner values (M, 3, C) with weights (M, 3)."""
    out = corner[:, 0] * w[:, 0:1]
    out = torch.addcmul(out, corner[:, 1], w[:, 1:2])
    return torch.addcmul(out, corner[:, 2], w[:, 2:3])


#: Elements per piece in :func:`_pow`: a multiple of every SIMD width, and below torch's
#: parallel grain (32768), so that torch runs each piece on one thread.
_POW_PIECE = 16384


def _pow(x: torch.Tensor, exponent: "torch.Tensor | float") -> torch.Tensor:
    """``x ** exponent`` elementwise, with the same bits whatever the number of CPU threads.

    torch computes ``pow`` with SIMD code for whole vectors and another path
    for the partial vector at the end of each thread's share, and the two
    differ in the last bit; so the shares' boundaries, which move with the
    thread count, moved a few pixels of a 512-px render by 6e-8. Fixed pieces
    (each run on one thread) make every element take the same path whatever
    the threads, so a study's worker processes (one thread each) render
    exactly what the main process (all cores) renders. On CUDA, where each
    element is computed alike, it is one call.
    """
    if x.device.type != "cpu" or x.numel() <= _POW_PIECE:
        return x.pow(exponent)
    flat = x.reshape(-1)
    per_element = isinstance(exponent, torch.Tensor) and exponent.dim() > 0
    e = exponent.expand_as(x).reshape(-1) if per_element else exponent
    parts = [flat[i:i + _POW_PIECE].pow(e[i:i + _POW_PIECE] if per_element else e)
             for i in range(0, flat.numel(), _POW_PIECE)]
    return torch.cat(parts).reshape(x.shape)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
