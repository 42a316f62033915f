"""Threshold and head masks: the skin/air level of a scan and the coarse-grid head segmentation.

Steps 1-3 of :func:`~mriface.surface.extract_head_surface` (``docs/surface.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import SurfaceError
from ..volume import Volume
from .headrest import RestCut, split_rest

__all__ = ["ThresholdEstimate", "estimate_threshold"]


@dataclass(frozen=True)
class ThresholdEstimate:
    """Intensity levels of one scan (its own units).

    Attributes
    ----------
    threshold : float
        Skin/air iso-level: midway between ``air`` and ``skin``.
    air : float
        Typical (median) intensity of the air around the head.
    skin : float
        Typical (median) intensity of the tissue just inside the skin.
    contrast : float
        ``(skin - air)`` divided by the robust spread of the air: a head scan
        gives tens, pure noise about 2.
    """

    threshold: float
    air: float
    skin: float
    contrast: float


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1D float sample (256-bin histogram)."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values, nbins=256))


def _block_mean(data: np.ndarray, k: "tuple[int, int, int]") -> np.ndarray:
    """Mean over (kx, ky, kz) blocks; the array is edge-padded to whole blocks.

    Returns
    -------
    numpy.ndarray
        float32 (ceil(X/kx), ceil(Y/ky), ceil(Z/kz)); coarse voxel c covers
        fine voxels ``c*k .. c*k + k - 1``.
    """
    pad = [(0, (-s) % kk) for s, kk in zip(data.shape, k)]
    if any(p[1] for p in pad):
        data = np.pad(data, pad, mode="edge")
    # strided adds along one axis at a time: several times faster than a
    # reshape-and-mean over 6 axes for block sizes of 2-4
    out = data
    for ax, kk in enumerate(k):
        if kk == 1:
            continue
        sl = [slice(None)] * 3
        sl[ax] = slice(0, None, kk)
        acc = out[tuple(sl)].astype(np.float32, copy=True)
        for j in range(1, kk):
            sl[ax] = slice(j, None, kk)
            acc += out[tuple(sl)]
        out = acc
    if out is data:
        return data.astype(np.float32, copy=True)
    out *= np.float32(1.0 / (k[0] * k[1] * k[2]))
    return out


def estimate_threshold(volume: Volume, *, coarse_mm: float = 2.0, _coarse=None) -> ThresholdEstimate:
    """Choose the skin/air iso-level of a scan from its own intensities.

    On a block-averaged copy, Otsu's threshold gives a rough head. ``air`` is
    the median of everything more than 6 mm outside it, ``skin`` the median of
    the shell 2-6 mm inside its boundary (skin and subcutaneous fat: no
    brain), and the level is midway between them; the rough head is then
    redrawn at that level and the estimate repeated once. Midway is where a
    partial-volume edge crosses, which puts the surface on the true boundary.
    For CT the level is clamped to the skin range -500..-200 HU.

    Parameters
    ----------
    volume : Volume
    coarse_mm : float
        Block size (mm) of the averaged copy.

    Returns
    -------
    ThresholdEstimate

    Raises
    ------
    SurfaceError
        When the scan shows no air/tissue contrast (e.g. pure noise).
    """
    from scipy import ndimage as ndi

    # medians need no detail: twice the segmentation block size is plenty
    k = _block_factors(volume.zooms, 2.0 * coarse_mm)
    if _coarse is not None and all(kk % kc == 0 for kk, kc in zip(k, _coarse[1])):
        # reuse the segmentation grid's block means (same result, less work)
        coarse = _block_mean(_coarse[0], tuple(kk // kc for kk, kc in zip(k, _coarse[1])))
    else:
        coarse = _block_mean(volume.data, k)
    cmm = float((np.asarray(k) * volume.zooms).min())
    lo, hi = np.percentile(coarse, [0.5, 99.5])
    t = _otsu(np.clip(coarse, lo, hi).ravel())
    r_air = max(1, int(round(6.0 / cmm)))
    # the shell is eroded-once minus eroded-r_skin times: r_skin must be >= 2
    # or the shell is empty (coarse voxels over 4 mm, e.g. 2.05-2.5 mm scans
    # averaged in 2x2x2 blocks, round 6 mm down to one voxel)
    r_skin = max(2, int(round(6.0 / cmm)))
    for _ in range(2):
        rough = coarse > t
        air_vox = coarse[~ndi.binary_dilation(rough, iterations=r_air)]
        shell = ndi.binary_erosion(rough, iterations=1) & ~ndi.binary_erosion(rough, iterations=r_skin)
        skin_vox = coarse[shell]
        if air_vox.size < 64 or skin_vox.size < 64:
            raise SurfaceError(
                f"{volume.name}: no head found (no air around an object, or no object): "
                "is this a head scan with air around the head?"
            )
        air, skin = float(np.median(air_vox)), float(np.median(skin_vox))
        t = 0.5 * (air + skin)
    if volume.modality == "ct":
        t = float(np.clip(t, -500.0, -200.0))
    spread = 1.4826 * float(np.median(np.abs(air_vox - air)))
    contrast = (skin - air) / max(spread, 1e-3 * abs(skin - air), 1e-30)
    return ThresholdEstimate(threshold=float(t), air=air, skin=skin, contrast=float(contrast))


def _block_factors(zooms: np.ndarray, coarse_mm: float) -> "tuple[int, int, int]":
    return tuple(max(1, int(round(coarse_mm / float(z)))) for z in zooms)  # type: ignore[return-value]


#: below this air/tissue contrast a scan is taken to hold no head (pure noise gives ~2-3)
_MIN_CONTRAST = 6.0
#: a head is at least this big (mm^3; a neonate's head is ~400 cm^3)
_MIN_HEAD_MM3 = 100_000.0


def _fill_holes(mask: np.ndarray, axis: "int | None") -> np.ndarray:
    """``mask`` plus every background region that does not reach the array's border.

    ``axis=None`` works in 3D; ``axis=a`` treats each slice across axis ``a``
    separately (a region is a hole when it is closed within its slice).
    One labelling pass instead of scipy's iterated dilation: much faster.
    """
    from scipy import ndimage as ndi

    if axis is None:
        st = ndi.generate_binary_structure(3, 1)
    else:
        st = np.zeros((3, 3, 3), bool)
        sl = [slice(None)] * 3
        sl[axis] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
    labels, n = ndi.label(~mask, structure=st)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for ax in range(3):
        if ax == axis:
            continue
        outside[np.unique(labels.take(0, axis=ax))] = True
        outside[np.unique(labels.take(-1, axis=ax))] = True
    outside[0] = True
    return mask | ~outside[labels]


def _filled(head: np.ndarray) -> np.ndarray:
    """``head`` with its internal air filled, in 3D and in every axial, coronal and sagittal slice."""
    filled = _fill_holes(head, None)
    # sinuses, airway and ear canals open to the outside in 3D but are closed
    # rings in slices across them
    for axis in range(3):
        filled |= _fill_holes(head, axis)
    return filled


@dataclass(frozen=True)
class _HeadMasks:
    """Coarse-grid masks (shape of the block-averaged volume)."""

    head: np.ndarray      # the head: largest object, internal air not filled
    interior: np.ndarray  # certainly inside: filled head, eroded
    exterior: np.ndarray  # certainly air: far from the head
    k: tuple              # block factors
    rest: "RestCut | None" = None  # a head rest cut off at the skin (headrest.py), or None


def _head_masks(volume: Volume, est: ThresholdEstimate, coarse_mm: float, coarse=None) -> _HeadMasks:
    """Segment the head on the coarse grid: remove other objects, fill internal air."""
    from scipy import ndimage as ndi

    k = _block_factors(volume.zooms, coarse_mm)
    if coarse is None:
        coarse = _block_mean(volume.data, k)
    cmm = np.asarray(k) * volume.zooms
    # a lower level than the iso-level keeps thin parts (ears, nose tip) that
    # block averaging dims below it
    mask = coarse > est.air + 0.5 * (est.threshold - est.air)
    # an opening cuts thin bridges to padding, head rests and markers
    opened = ndi.binary_opening(mask, iterations=1)
    labels, n = ndi.label(opened)
    if n == 0:
        raise SurfaceError(f"{volume.name}: no head found: nothing above the skin threshold {est.threshold:g}")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    r_grow = max(1, int(round(20.0 / cmm.min())))
    r_in = max(1, int(np.ceil(4.0 / cmm.min())))
    r_out = max(1, int(np.ceil(6.0 / cmm.min())))
    # everything below happens near the largest object: work on bounding
    # boxes with margins instead of the whole scan (a third of its voxels)
    lab = int(np.argmax(sizes))
    grow_box = _margin_box(labels == lab, r_grow)
    head = np.zeros(mask.shape, bool)
    # grow back what the opening shaved off (ears, nose), but only ~2 cm
    head[grow_box] = ndi.binary_dilation(labels[grow_box] == lab, iterations=r_grow, mask=mask[grow_box])
    # the head's box plus r_out and one voxel more, so that the background
    # touching the box's border is the air around the head, as at the
    # array's border
    crop = _margin_box(head, r_out + 1)
    head_c = head[crop]
    head_mm3 = float(np.count_nonzero(head_c) * np.prod(cmm))
    if est.contrast < _MIN_CONTRAST or head_mm3 < _MIN_HEAD_MM3:
        raise SurfaceError(
            f"{volume.name}: no head found (air/tissue contrast {est.contrast:.1f}, largest object "
            f"{head_mm3 / 1000:.0f} cm^3); is this a head scan? Give a volume showing the whole face"
        )
    filled = _filled(head_c)
    # a head rest, cradle or table lying against the skin is joined to the
    # head over the contact patch and survives the opening above: cut it off
    # by shape (thin and far-reaching; headrest.py). On the filled head: an
    # MR skull is dark, and the scalp over it is a thin shell too.
    rest = split_rest(filled, cmm, coarse[crop], est.air)
    if rest is not None:
        rest = replace(rest, box=crop)
        labels, _ = ndi.label(head_c & ~rest.rest)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        head_c = labels == int(np.argmax(sizes))
        head[crop] = head_c
        filled = _filled(head_c)
    # border_value=1: the head may be cut by the scan's edge (neck, chin);
    # that cut is not skin and must not erode the interior. Where the box is
    # inside the array its border is air (the margin), so this changes nothing.
    interior_c = ndi.binary_erosion(filled, iterations=r_in, border_value=1)
    # from the filled head, so that certain air never touches certain tissue
    exterior_c = ~ndi.binary_dilation(filled, iterations=r_out)
    interior = np.zeros(mask.shape, bool)
    exterior = np.ones(mask.shape, bool)
    interior[crop], exterior[crop] = interior_c, exterior_c
    if rest is not None:
        # certain tissue is never capped
        mat = rest.material
        if mat is not None:
            mat = (mat[0] & ~interior_c,) + tuple(mat[1:])
        rest = replace(rest, zone=rest.zone & ~interior_c, material=mat)
    return _HeadMasks(head=head, interior=interior, exterior=exterior, k=k, rest=rest)


def _margin_box(mask: np.ndarray, margin: int) -> "tuple[slice, slice, slice]":
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(0, int(nz[0]) - margin), min(mask.shape[ax], int(nz[-1]) + 1 + margin)))
    return tuple(box)
