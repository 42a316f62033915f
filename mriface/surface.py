"""Reconstruct the skin surface of a head and locate its face.

Stage 2 of the data flow (``Volume -> HeadSurface``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FaceFrame", "HeadSurface"]


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
