"""Load a head scan into a :class:`Volume` in RAS+ canonical orientation.

Stage 1 of the data flow (``scan file -> Volume``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Volume"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan in world space.

    Attributes
    ----------
    data : numpy.ndarray
        float32 array of shape (X, Y, Z), voxel axes ordered so that they point
        right, anterior and superior (nibabel's RAS+ canonical reorientation).
        Finite everywhere.
    affine : numpy.ndarray
        4x4 float64 voxel-index -> world (scanner RAS+, millimetres) matrix.
    modality : str
        ``"mr"`` or ``"ct"`` (CT intensities are Hounsfield units).
    path : pathlib.Path or None
        The file it came from, for messages; None for volumes built in memory.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "mr"
    path: "Path | None" = field(default=None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (X, Y, Z)."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size along each array axis in mm, shape (3,)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def name(self) -> str:
        """A short label for messages: the file name, or ``"<in-memory volume>"``."""
        return str(self.path) if self.path is not None else "<in-memory volume>"
