"""Lights and skin material as plain tensors, one row per image.

Lighting is one directional light plus ambient light; the material is a
Lambertian skin albedo with a Blinn-Phong specular lobe. Colours are linear
RGB; the shader converts to sRGB at the end, like a camera's tone curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor_batch import TensorBatch

__all__ = ["Lights", "Material", "kelvin_to_rgb"]


@dataclass(frozen=True, eq=False)
class Lights(TensorBatch):
    """Directional + ambient light for N images (a :class:`~mriface.render.tensor_batch.TensorBatch`).

    Attributes
    ----------
    direction : torch.Tensor
        (N, 3) unit vectors in world RAS+ pointing from the surface *towards*
        the light.
    color : torch.Tensor
        (N, 3) linear RGB of the directional light, already scaled by its
        intensity.
    ambient : torch.Tensor
        (N, 3) linear RGB of the ambient light.
    """

    direction: torch.Tensor
    color: torch.Tensor
    ambient: torch.Tensor


@dataclass(frozen=True, eq=False)
class Material(TensorBatch):
    """Skin material for N images (a :class:`~mriface.render.tensor_batch.TensorBatch`).

    Attributes
    ----------
    albedo : torch.Tensor
        (N, 3) linear RGB diffuse reflectance in [0, 1].
    specular : torch.Tensor
        (N,) strength of the specular lobe (0 = matte).
    shininess : torch.Tensor
        (N,) Blinn-Phong exponent (larger = tighter highlight).
    """

    albedo: torch.Tensor
    specular: torch.Tensor
    shininess: torch.Tensor


def kelvin_to_rgb(kelvin: torch.Tensor) -> torch.Tensor:
    """Linear RGB of a black body at ``kelvin`` (N,), normalised so green = 1.

    Planck's law integrated against narrow bands at 610 / 550 / 465 nm (the
    peaks of typical camera R, G, B filters); 6500 K gives roughly white. A
    smooth function, so colour temperature is differentiable too.

    Returns
    -------
    torch.Tensor
        (N, 3) RGB multipliers, green channel exactly 1.
    """
    kelvin = torch.as_tensor(kelvin, dtype=torch.float32)
    lam = torch.tensor([610e-9, 550e-9, 465e-9], dtype=kelvin.dtype, device=kelvin.device)
    c2 = 1.4388e-2  # second radiation constant, m K
    rad = lam.pow(-5) / torch.expm1(c2 / (lam[None, :] * kelvin[:, None]))
    rgb = rad / rad[:, 1:2]
    # white balance to D65 so that 6500 K light is neutral, like a camera set to daylight
    ref = lam.pow(-5) / torch.expm1(c2 / (lam * 6500.0))
    ref = ref / ref[1]
    return rgb / ref
