"""A scan file of either kind: a volume (:class:`~mriface.volume.Volume`) or a mesh (:class:`~mriface.surface.HeadSurface`).

Users have head surfaces from FreeSurfer (``mkheadsurf``), photogrammetry and
3D face scanners as well as MRI and CT volumes. A study's manifest rows,
``mriface render`` and ``mriface surface`` take either, through :func:`load_scan`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from .surface import HeadSurface
    from .volume import Volume

__all__ = ["load_scan"]


def load_scan(path: "str | os.PathLike[str]") -> "Volume | HeadSurface":
    """A scan file as a :class:`~mriface.volume.Volume`, or a mesh file as a :class:`~mriface.surface.HeadSurface`.

    Wherever a study or the command line takes a scan, it takes a mesh too.
    A mesh (:func:`mriface.surface.is_mesh_file`: OBJ, PLY, GIfTI, FreeSurfer)
    is read with :func:`mriface.surface.load_surface`, which estimates its
    face frame as for a volume's surface; a surface ``.npz`` written by
    mriface keeps its frame. Anything else goes to :func:`mriface.volume.load_volume`.
    """
    from .surface import is_mesh_file

    p = Path(path)
    if p.name.lower().endswith(".npz"):
        from .errors import InputFileError
        from .surface import load_surface_npz

        try:
            return load_surface_npz(p)
        except (OSError, KeyError, ValueError) as exc:
            raise InputFileError(f"{p}: not a surface .npz written by mriface ({exc}); give a scan, "
                                 "a mesh file or such an .npz") from exc
    if is_mesh_file(p):
        from .surface import load_surface

        return load_surface(p)
    from .volume import load_volume

    return load_volume(p)
