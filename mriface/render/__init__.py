"""Photo-like renders of head surfaces: protocol, cameras, lights, rasterize, shade.

Two steps with one seam: a backend rasterizes (:func:`rasterize` ->
:class:`Fragments`: triangle id, barycentrics and depth per pixel) and one
torch function, :func:`shade`, turns fragments into images. ``zbuffer`` (pure
torch) rasterizes on CUDA by default and also runs on the CPU, ``embree``
ray-casts on the CPU (its default), ``pytorch3d`` remains for soft silhouettes
and its users; all feed the same shader, so their images agree.

High level::

    batch = render_views(surfaces, RenderProtocol(seed=0))
    write_renders(batch, "renders/")

Low level::

    cams = look_at_face(surface.frame, azimuth_deg=[0, 20], elevation_deg=0, roll_deg=0,
                        distance_mm=600, fov_deg=27)
    frags = rasterize(verts, faces, cams, 256, backend="embree")
    images = shade(frags, verts, faces, normals, cams, lights, material)
"""

from .cameras import Cameras, look_at_face, pixel_ndc
from .io import render_filename, write_renders
from .lights import Lights, Material, kelvin_to_rgb
from .protocol import PARAM_COLUMNS, RenderBatch, RenderProtocol, render_views, sample_view_params, scene_from_params
from .rasterize import BACKENDS, Fragments, concat_meshes, front_faces, rasterize, resolve_backend
from .shade import shade, vertex_normals

__all__ = [
    "RenderProtocol", "RenderBatch", "render_views", "write_renders", "render_filename",
    "sample_view_params", "scene_from_params", "PARAM_COLUMNS",
    "Cameras", "look_at_face", "pixel_ndc",
    "Lights", "Material", "kelvin_to_rgb",
    "Fragments", "rasterize", "resolve_backend", "concat_meshes", "front_faces", "BACKENDS",
    "shade", "vertex_normals",
]
