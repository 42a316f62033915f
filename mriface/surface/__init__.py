"""Reconstruct the skin surface of a head and locate its face.

Stage 2 of the data flow (``Volume -> HeadSurface``).

:func:`extract_head_surface` turns a :class:`~mriface.volume.Volume` into the
closed outer skin surface with its :class:`FaceFrame`; :func:`load_surface`
reads a mesh another tool made (OBJ, PLY, GIfTI, FreeSurfer) and finds the
face on it the same way. ``docs/surface.md`` explains the method and defaults.

The package follows the steps, one job per module (none imports upward):

========== ===================================================================
module     job
========== ===================================================================
types      :class:`FaceFrame`, :class:`HeadSurface`, ``crop_face``, ``.npz`` cache
masks      skin/air threshold (:func:`estimate_threshold`), coarse head masks
field      isotropic working grid, smoothed and forced intensity field
marching   marching cubes (torch on any device; scikit-image on the CPU)
mesh       topology, components, winding, normals, Taubin smoothing
frame      the face frame from the surface's shape (:func:`estimate_face_frame`)
extract    :func:`extract_head_surface`: the steps in order
io         mesh files: :func:`load_surface`, :func:`save_surface`, :func:`is_mesh_file`
========== ===================================================================
"""

from __future__ import annotations

from .extract import extract_head_surface
from .frame import estimate_face_frame
from .io import MESH_SUFFIXES, is_mesh_file, load_surface, save_surface
from .marching import marching_cubes_torch
from .masks import ThresholdEstimate, estimate_threshold
from .mesh import mesh_topology, taubin_smooth, vertex_normals_np
from .types import FaceFrame, HeadSurface, crop_face, load_surface_npz, save_surface_npz

__all__ = [
    "FaceFrame",
    "HeadSurface",
    "crop_face",
    "save_surface_npz",
    "load_surface_npz",
    "extract_head_surface",
    "estimate_threshold",
    "ThresholdEstimate",
    "estimate_face_frame",
    "marching_cubes_torch",
    "mesh_topology",
    "vertex_normals_np",
    "taubin_smooth",
    "load_surface",
    "save_surface",
    "is_mesh_file",
    "MESH_SUFFIXES",
]
