"""Pinhole cameras placed in a head's face frame.

Conventions (shared by every backend, identical to pytorch3d's so its
rasterizer can be fed directly):

* world -> camera: ``X_cam = X_world @ R + T`` with row vectors; ``R`` is
  (N, 3, 3) whose *columns* are the camera axes expressed in world RAS+.
* camera space: +Z looks from the camera into the scene, +X points to the
  image's **left**, +Y to the image's top (pytorch3d's NDC: +X left, +Y up).
* projection: ``x_ndc = x_cam / (z_cam * tan(fov/2))`` (square images only),
  the same for y; depth is ``z_cam`` in mm.
* pixel centres: column ``j`` of a ``S``-pixel-wide image sits at
  ``x_ndc = 1 - (2 j + 1) / S``; row ``i`` at ``y_ndc = 1 - (2 i + 1) / S``
  (row 0 is the top of the image, column 0 its left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .tensor_batch import TensorBatch

__all__ = ["Cameras", "look_at_face", "pixel_ndc"]


@dataclass(frozen=True, eq=False)
class Cameras(TensorBatch):
    """A batch of N perspective pinhole cameras with square images.

    A :class:`~mriface.render.tensor_batch.TensorBatch`: ``len``, ``.to``,
    indexing and ``Cameras.cat`` come from there.

    Attributes
    ----------
    R : torch.Tensor
        (N, 3, 3) rotation; columns are the camera's x (image left), y (image
        up) and z (viewing direction) axes in world RAS+.
    T : torch.Tensor
        (N, 3) translation, mm: ``X_cam = X_world @ R + T``.
    fov_deg : torch.Tensor
        (N,) full vertical (= horizontal) field of view, degrees.
    znear, zfar : float
        Clip depths, mm (used by the pytorch3d backend; rays ignore them).
    """

    R: torch.Tensor
    T: torch.Tensor
    fov_deg: torch.Tensor
    znear: float = 1.0
    zfar: float = 10000.0

    def centers(self) -> torch.Tensor:
        """(N, 3) camera positions in world RAS+, mm (``-T @ R^T``)."""
        return -torch.einsum("nj,nij->ni", self.T, self.R)

    def tan_half_fov(self) -> torch.Tensor:
        """(N,) ``tan(fov / 2)``."""
        return torch.tan(torch.deg2rad(self.fov_deg) / 2)

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Camera coordinates (mm) of ``points`` (N, P, 3) or (P, 3) world RAS+."""
        if points.dim() == 2:
            points = points.expand(len(self), -1, -1)
        return torch.bmm(points, self.R.to(points.dtype)) + self.T.to(points.dtype)[:, None, :]

    def project(self, points: torch.Tensor, image_size: int) -> torch.Tensor:
        """Pixel coordinates (column, row) of world points: (N, P, 2), continuous.

        Pixel ``(j, i)`` has its centre at ``(j + 0.5, i + 0.5)``.
        """
        cam = self.world_to_camera(points)
        th = self.tan_half_fov().to(cam.dtype)[:, None]
        x_ndc = cam[..., 0] / (cam[..., 2] * th)
        y_ndc = cam[..., 1] / (cam[..., 2] * th)
        col = (1 - x_ndc) * image_size / 2
        row = (1 - y_ndc) * image_size / 2
        return torch.stack([col, row], dim=-1)

    def ray_directions(self, image_size: int) -> torch.Tensor:
        """World-space direction of the ray through every pixel centre: (N, S, S, 3).

        Not normalised: each has camera-space z = 1, so a hit's ray parameter
        ``t`` equals its depth ``z_cam`` in mm, exactly what the rasterizer's
        z-buffer holds.
        """
        ndc = pixel_ndc(image_size, device=self.R.device, dtype=self.R.dtype)  # (S,) from +1 to -1
        th = self.tan_half_fov()[:, None, None]
        x = (ndc[None, None, :] * th).expand(-1, image_size, -1)
        y = (ndc[None, :, None] * th).expand(-1, -1, image_size)
        d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (N,S,S,3)
        # camera -> world: d_world = d_cam @ R^T
        return torch.einsum("nhwj,nij->nhwi", d_cam, self.R)


def pixel_ndc(image_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(S,) NDC coordinate of each pixel centre: ``1 - (2 k + 1) / S``.

    Index ``k`` is the column (x) or the row (y); both run from +1 (left / top)
    towards -1, matching pytorch3d.
    """
    k = torch.arange(image_size, device=device, dtype=torch.float64)
    return (1 - (2 * k + 1) / image_size).to(dtype)


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation of ``angle`` radians about the unit ``axis`` (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def look_at_face(
    frame,
    azimuth_deg,
    elevation_deg,
    roll_deg,
    distance_mm,
    fov_deg,
    *,
    target_offset_mm=None,
    device="cpu",
    dtype=torch.float32,
) -> Cameras:
    """Cameras on a sphere around the face centre, looking at it.

    Parameters
    ----------
    frame : mriface.surface.FaceFrame
        Face centre, out-of-face direction and up, world RAS+ mm.
    azimuth_deg, elevation_deg, roll_deg, distance_mm, fov_deg : array_like
        (N,) each (scalars broadcast). Azimuth turns the camera about
        ``frame.up`` towards ``frame.right`` (the subject's left; image right)
        for positive angles; elevation raises it towards ``frame.up``; positive
        roll turns the camera about its viewing axis so that the head appears
        rotated counter-clockwise in the image (its top moves to image left);
        distance is from camera to face centre, mm;
        fov is the full field of view, degrees.
    target_offset_mm : array_like, optional
        (N, 3) offset of the look-at point from ``frame.center`` in the face
        frame's (right, up, forward) coordinates, mm. Default zero.
    device, dtype
        Of the returned tensors.

    Returns
    -------
    Cameras
        N cameras. Azimuth = elevation = roll = 0 is a frontal portrait: the
        face frame's up is image up and its right is image right.
    """
    az, el, roll, dist, fov = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64).reshape(-1) for a in (azimuth_deg, elevation_deg, roll_deg, distance_mm, fov_deg))
    )
    n = az.size
    right, up, fwd = (np.asarray(v, np.float64) for v in (frame.right, frame.up, frame.forward))
    center = np.asarray(frame.center, np.float64)
    offs = np.zeros((n, 3)) if target_offset_mm is None else np.broadcast_to(np.asarray(target_offset_mm, np.float64), (n, 3))
    R = np.empty((n, 3, 3))
    T = np.empty((n, 3))
    for k in range(n):
        a, e = math.radians(az[k]), math.radians(el[k])
        out = math.cos(e) * (math.cos(a) * fwd + math.sin(a) * right) + math.sin(e) * up
        target = center + offs[k] @ np.stack([right, up, fwd])
        eye = target + dist[k] * out
        z = -out
        x = np.cross(up, z)
        if np.linalg.norm(x) < 1e-8:  # looking straight down/up: any perpendicular will do
            x = np.cross(fwd, z)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        rot = _rotation_about(z, math.radians(roll[k]))
        x, y = rot @ x, rot @ y
        R[k] = np.stack([x, y, z], axis=1)
        T[k] = -eye @ R[k]
    return Cameras(
        torch.as_tensor(R, dtype=dtype, device=device),
        torch.as_tensor(T, dtype=dtype, device=device),
        torch.as_tensor(fov, dtype=dtype, device=device),
    )
