"""Photo-like renders of head surfaces: protocol, cameras, lights, rasterize, shade.

Two steps with one seam: a backend rasterizes (its ``hits(scene)`` ->
:class:`Hits`: the triangle id, barycentrics and depth of every covered pixel;
:func:`rasterize` returns them as full-size :class:`Fragments`) and one torch
function, :func:`shade`, turns them into images. Backends are plug-ins
(:mod:`mriface.render.backends`: :func:`register_backend`, :func:`get_backend`,
:func:`available_backends`). Built in: ``zbuffer`` (pure torch) rasterizes on
CUDA by default and also runs on the CPU, ``embree`` ray-casts on the CPU (its
default), ``pytorch3d`` remains for soft silhouettes and its users; all feed
the same shader, so their images agree.

High level::

    batch = render_views(surfaces, RenderProtocol(seed=0))
    write_renders(batch, "renders/")

Low level::

    cams = look_at_face(surface.frame, azimuth_deg=[0, 20], elevation_deg=0, roll_deg=0,
                        distance_mm=600, fov_deg=27)
    frags = rasterize(verts, faces, cams, 256, backend="embree")
    images = shade(frags, verts, faces, normals, cams, lights, material)
"""

from .backends import Backend, Scene, available_backends, get_backend, register_backend, unregister_backend
from .cameras import Cameras, look_at_face, pixel_ndc
from .fragments import Fragments, Hits, fragments_to_hits, hits_to_fragments
from .geometry import concat_meshes, front_faces, ray_triangle_hits
from .io import render_filename, write_renders
from .lights import Lights, Material, kelvin_to_rgb
from .protocol import PARAM_COLUMNS, RenderBatch, RenderProtocol, render_views, sample_view_params, scene_from_params
from .rasterize import rasterize, resolve_backend
from .shade import shade, vertex_normals_torch
from .tensor_batch import TensorBatch

__all__ = [
    "RenderProtocol", "RenderBatch", "render_views", "write_renders", "render_filename",
    "sample_view_params", "scene_from_params", "PARAM_COLUMNS",
    "Cameras", "look_at_face", "pixel_ndc",
    "Lights", "Material", "kelvin_to_rgb", "TensorBatch",
    "Backend", "Scene", "register_backend", "unregister_backend", "get_backend", "available_backends",
    "Hits", "Fragments", "hits_to_fragments", "fragments_to_hits",
    "rasterize", "resolve_backend", "concat_meshes", "front_faces", "ray_triangle_hits",
    "shade", "vertex_normals_torch",
]
