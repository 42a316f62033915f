"""What a backend hands the shader: sparse :class:`Hits` or dense :class:`Fragments`.

A backend answers one question per pixel: which triangle is visible there,
where inside it (barycentric weights) and how far from the camera (depth
``z_cam``, mm). :class:`Hits` lists only the covered pixels, which is what
ray casters and z-buffers naturally produce and what the shader consumes;
:class:`Fragments` is the same information as full (N, S, S) images, for
users who want per-pixel maps. :func:`hits_to_fragments` and
:func:`fragments_to_hits` convert one into the other without changing a value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fragments", "Hits", "hits_to_fragments", "fragments_to_hits"]


@dataclass(frozen=True, eq=False)
class Fragments:
    """What each pixel sees.

    Attributes
    ----------
    pix_to_face : torch.Tensor
        (N, S, S) int64 row index into the ``faces`` given to
        :func:`~mriface.render.rasterize` (into the concatenated faces when a
        list of meshes was given), ``-1`` where the ray misses every triangle.
    bary : torch.Tensor
        (N, S, S, 3) barycentric weights of the visible point with respect to
        the triangle's three vertices (perspective-correct; zero on background).
    depth : torch.Tensor
        (N, S, S) camera-space depth ``z_cam`` of the visible point, mm;
        ``-1`` on background.
    """

    pix_to_face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(N, S, S) bool coverage: True where a triangle is visible."""
        return self.pix_to_face >= 0

    @property
    def image_size(self) -> int:
        return int(self.pix_to_face.shape[-1])


@dataclass(frozen=True, eq=False)
class Hits:
    """The covered pixels of N images of side S, as compact lists (no background pixels).

    Attributes
    ----------
    pixel : torch.Tensor
        (M,) int64 flat index ``view * S * S + row * S + col``, strictly increasing.
    face : torch.Tensor
        (M,) int64 visible row of the scene's faces (of the concatenated faces,
        see :func:`~mriface.render.concat_meshes`, when there are several meshes).
    bary : torch.Tensor
        (M, 3) float barycentric weights of the triangle's vertices 0, 1, 2.
    depth : torch.Tensor
        (M,) camera-space depth ``z_cam`` of the hit, mm; same dtype as ``bary``.
    n_images : int
        N.
    image_size : int
        S, pixels.
    """

    pixel: torch.Tensor
    face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    n_images: int
    image_size: int

    def __len__(self) -> int:
        return int(self.pixel.shape[0])


def hits_to_fragments(hits: Hits) -> Fragments:
    """Full-size :class:`Fragments` of ``hits``: background ``-1`` / zero barycentrics / depth ``-1``.

    Differentiable: gradients flow from the fragments' ``bary`` and ``depth``
    back to the hits' (out-of-place scatter).
    """
    n, s = int(hits.n_images), int(hits.image_size)
    dev, dt = hits.pixel.device, hits.bary.dtype
    pix_to_face = torch.full((n * s * s,), -1, dtype=torch.int64, device=dev)
    pix_to_face[hits.pixel] = hits.face
    bary = torch.zeros((n * s * s, 3), dtype=dt, device=dev).index_put((hits.pixel,), hits.bary)
    depth = torch.full((n * s * s,), -1.0, dtype=dt, device=dev).index_put((hits.pixel,), hits.depth.to(dt))
    return Fragments(pix_to_face.reshape(n, s, s), bary.reshape(n, s, s, 3), depth.reshape(n, s, s))


def fragments_to_hits(fragments: Fragments) -> Hits:
    """The covered pixels of ``fragments`` as :class:`Hits` (in pixel order); differentiable."""
    n, s = (int(x) for x in fragments.pix_to_face.shape[:2])
    # index_select on flat tensors: much faster than advanced indexing on the CPU
    p2f = fragments.pix_to_face.reshape(n * s * s)
    covered = torch.nonzero(p2f >= 0).flatten()
    return Hits(covered, p2f.index_select(0, covered), fragments.bary.reshape(n * s * s, 3).index_select(0, covered),
                fragments.depth.reshape(n * s * s).index_select(0, covered), n, s)
