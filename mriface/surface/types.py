"""The surface's data types: :class:`FaceFrame`, :class:`HeadSurface`, and their ``.npz`` cache format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FaceFrame", "HeadSurface", "crop_face", "save_surface_npz", "load_surface_npz"]


@dataclass(frozen=True, eq=False)
class FaceFrame:
    """Where the face is and which way it looks, in world RAS+ millimetres.

    Attributes
    ----------
    center : numpy.ndarray
        (3,) float64, mm. The middle of the face: the point cameras look at.
        It lies inside the head just behind the skin of the mid-face (about
        the height of the nose bridge / cheekbones), on the midline.
    forward : numpy.ndarray
        (3,) unit vector pointing out of the face (anterior for an upright,
        untilted head).
    up : numpy.ndarray
        (3,) unit vector orthogonal to ``forward`` pointing to the top of the
        head (superior for an untilted head).
    """

    center: np.ndarray
    forward: np.ndarray
    up: np.ndarray

    @property
    def right(self) -> np.ndarray:
        """(3,) unit ``up x forward``: image right for a camera facing the face.

        That is the subject's *left*; (right, up, forward) is right-handed, like
        an OpenGL camera's (x, y, z) when the camera looks along ``-forward``.
        """
        return np.cross(self.up, self.forward)

    def basis(self) -> np.ndarray:
        """3x3 matrix whose columns are ``right``, ``up``, ``forward`` (face -> world rotation)."""
        return np.stack([self.right, self.up, self.forward], axis=1)


@dataclass(frozen=True, eq=False)
class HeadSurface:
    """A triangle mesh of the skin with its face frame.

    Attributes
    ----------
    verts : numpy.ndarray
        (V, 3) float32 vertex positions, mm, world RAS+.
    faces : numpy.ndarray
        (F, 3) int64 vertex indices, counter-clockwise seen from outside, so
        that triangle normals point out of the head.
    normals : numpy.ndarray
        (V, 3) float32 unit vertex normals pointing out of the head.
    frame : FaceFrame
        The face's position and orientation.
    """

    verts: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    frame: FaceFrame

    @property
    def n_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])


def crop_face(surface: HeadSurface, *, behind_mm: float = 30.0) -> HeadSurface:
    """Keep only the front of the head: the part a camera facing the face can see.

    A triangle is kept when all three vertices lie less than ``behind_mm``
    behind the plane through ``frame.center`` orthogonal to ``frame.forward``.
    Cameras within about 60 degrees of frontal never see the rest, and
    dropping it roughly halves ray-casting and rasterization work.

    Parameters
    ----------
    surface : HeadSurface
        Whole head, mm.
    behind_mm : float
        How far behind the face centre (mm, along ``-forward``) to keep.

    Returns
    -------
    HeadSurface
        A new surface with unused vertices removed; same frame.

    Examples
    --------
    >>> import numpy as np
    >>> frame = FaceFrame(np.zeros(3), np.array([0., 1, 0]), np.array([0., 0, 1]))
    >>> verts = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, -50, 0]], np.float32)
    >>> faces = np.array([[0, 1, 2], [0, 1, 3]])
    >>> s = HeadSurface(verts, faces, np.tile([[0., 1, 0]], (4, 1)).astype(np.float32), frame)
    >>> crop_face(s, behind_mm=30).n_faces
    1
    """
    depth = (surface.verts - surface.frame.center) @ surface.frame.forward
    keep_vert = depth > -behind_mm
    keep_face = keep_vert[surface.faces].all(axis=1)
    faces = surface.faces[keep_face]
    used = np.unique(faces)
    remap = np.full(surface.n_verts, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return HeadSurface(
        verts=surface.verts[used],
        faces=remap[faces],
        normals=surface.normals[used],
        frame=surface.frame,
    )


def save_surface_npz(surface: HeadSurface, path) -> None:
    """Write a surface to a compressed ``.npz`` (atomic), for caching between runs."""
    from .._io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, verts=surface.verts, faces=surface.faces, normals=surface.normals,
                center=surface.frame.center, forward=surface.frame.forward, up=surface.frame.up,
            )


def load_surface_npz(path) -> HeadSurface:
    """Read a surface written by :func:`save_surface_npz`."""
    with np.load(path) as z:
        frame = FaceFrame(z["center"], z["forward"], z["up"])
        return HeadSurface(z["verts"], z["faces"], z["normals"], frame)
