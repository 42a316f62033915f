"""Head rests, cradles and tables joined to the skin: found on the coarse head mask, cut off at the contact.

Part of step 2 of :func:`~mriface.surface.extract_head_surface` (``docs/surface.md``,
"Head rests touching the head").

A CT head lies in a cradle (plastic, foam) on a table. Where the cradle
touches the skin both are above the skin/air level, so the head mask holds
the cradle too (the 2 mm opening of step 2 only cuts bridges thinner than
~4 mm). They differ in shape: the head is thick everywhere except its
protrusions (nose, ears, lips), which are short; a rest is a thin wall that
runs on far from the head. So:

1. *Core*: the head mask opened with a ball of radius ``_OPEN_MM`` (distance
   transforms, exact Euclidean ball on anisotropic grids), largest piece. The
   ball does not fit in a wall thinner than ``2 * _OPEN_MM``, so the core is
   the head without its protrusions and without the rest, except where the
   rest lies flat against the skin (the contact patch), where the ball can
   straddle skin and rest.
2. *Residue*: the mask minus the core, in connected pieces. A piece whose
   geodesic reach from the core (steps inside the piece) exceeds
   ``_REACH_MM`` is a rest; nose, ears and lips reach 10-30 mm.
3. The rests are removed from the head mask, and on the fine grid the
   intensity field inside the rests (and 2 coarse voxels around them) is
   capped by the core's signed distance, so that the skin there is the
   core's boundary (sub-voxel, from the distance field) and no stub of the
   rest remains as part of the surface.

When no piece reaches that far (every MR sample head, and CT without a
touching rest) nothing changes: the result is bit-identical to not looking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__: "list[str]" = []

#: ball radius (mm) of the opening: walls thinner than twice this are not head
_OPEN_MM = 12.0
#: a residue piece reaching further than this (mm, geodesic) from the core is a rest
_REACH_MM = 50.0
#: pieces smaller than this (mm^3) are not checked (specks; no rest is this small)
_MIN_PIECE_MM3 = 10_000.0
#: the capped zone: the rest grown by this many coarse voxels (covers the contact)
_ZONE_VOX = 2
#: rest and skin are told apart by material when they differ by this fraction of skin - air
_MIN_MATERIAL = 0.08


@dataclass(frozen=True)
class RestCut:
    """What :func:`split_rest` found, on the coarse grid's box ``box`` (slices into the coarse array).

    rest : bool array, the rest's voxels (removed from the head mask)
    zone : bool array, where the fine field is capped (the rest grown by ``_ZONE_VOX``)
    sd : float32 array, signed distance (mm) to the core's boundary, > 0 outside
    reach_mm : geodesic reach of each rest piece found (mm; lower bounds when capped)
    material : (zone, mid, sign, half) or None: where the rest was followed into the core by its
        material (:func:`_material`, grown by a voxel), the level between rest and skin, and
        +1 when the rest is the brighter, half their difference
    """

    box: tuple
    rest: np.ndarray
    zone: np.ndarray
    sd: np.ndarray
    reach_mm: tuple
    material: "tuple | None" = None


def _reach_steps(piece: np.ndarray, seeds: np.ndarray, limit: int) -> int:
    """Breadth-first steps (18-connected) from ``seeds`` through ``piece``; stops after ``limit``."""
    from scipy import ndimage as ndi

    st = ndi.generate_binary_structure(3, 2)
    reached = seeds & piece
    front = reached
    steps = 0
    while front.any() and steps < limit:
        grown = ndi.binary_dilation(front, structure=st, mask=piece) & ~reached
        reached |= grown
        front = grown
        steps += 1
    return steps if not front.any() else limit + 1


def _pool2(mask: np.ndarray) -> np.ndarray:
    """Any-pooling over 2x2x2 blocks (edge-padded to whole blocks)."""
    pad = [(0, s % 2) for s in mask.shape]
    if any(p[1] for p in pad):
        mask = np.pad(mask, pad, mode="edge")
    out = mask[0::2] | mask[1::2]
    out = out[:, 0::2] | out[:, 1::2]
    return out[:, :, 0::2] | out[:, :, 1::2]


def _rests(head: np.ndarray, cmm: np.ndarray, reach_mm: float = _REACH_MM):
    """Core and far-reaching residue of ``head`` (steps 1-2 of the module notes).

    Returns (core, rest, sd, din, reaches) or None when no residue piece reaches ``reach_mm``.
    """
    from scipy import ndimage as ndi

    din = ndi.distance_transform_edt(head, sampling=cmm)
    eroded = din > _OPEN_MM
    if not eroded.any():
        return None
    # distance to the eroded set minus the radius: the opened mask is sd <= 0,
    # and the same numbers give its boundary at sub-voxel precision later
    sd = (ndi.distance_transform_edt(~eroded, sampling=cmm) - _OPEN_MM).astype(np.float32)
    opened = (sd <= 0) & head
    labels, n = ndi.label(opened)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    core = labels == int(np.argmax(sizes))
    # other opened pieces (a thick table) are outside the head
    sd[opened & ~core] = np.float32(_OPEN_MM)
    residue = head & ~core
    labels, n = ndi.label(residue)
    if n == 0:
        return None
    seeds = ndi.binary_dilation(core) & residue
    vox_mm3 = float(np.prod(cmm))
    limit = int(np.ceil(reach_mm / float(cmm.min())))
    rest = np.zeros(head.shape, bool)
    reaches = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        piece = labels[sl] == i
        if piece.sum() * vox_mm3 < _MIN_PIECE_MM3:
            continue
        # a piece shorter than the limit in every direction cannot reach it
        if max(s.stop - s.start for s in sl) < limit / 2:
            continue
        steps = _reach_steps(piece, seeds[sl], limit)
        if steps > limit:
            rest[sl] |= piece
            reaches.append(float(steps * cmm.min()))
    if not reaches:
        return None
    return core, rest, sd, din, tuple(reaches)


def split_rest(head: np.ndarray, cmm: np.ndarray, vals: "np.ndarray | None" = None,
               air: float = 0.0) -> "RestCut | None":
    """Find rests joined to the head on a coarse head mask (see the module notes).

    Parameters
    ----------
    head : (X, Y, Z) bool
        The coarse head mask (already cropped to the head's box plus a margin).
    cmm : (3,) float
        Coarse voxel size (mm).
    vals : (X, Y, Z) float, optional
        The coarse block means: with them the rest is also followed into the
        core by its material (:func:`_material`).
    air : float
        The scan's air level (:class:`~mriface.surface.masks.ThresholdEstimate`).

    Returns
    -------
    RestCut or None
        None when no residue piece reaches ``_REACH_MM`` from the core
        (then nothing is to change).
    """
    from scipy import ndimage as ndi

    cmm = np.asarray(cmm, float)
    # a first look on a grid twice as coarse (any-pooled, which keeps thin
    # walls): 8x fewer voxels, so that scans without a rest (all MR) pay
    # little; only when it sees a rest is the full-resolution look taken
    # (at half the reach: a gate, not the decision; steps on anisotropic
    # grids are counted at the smallest voxel size)
    if _rests(_pool2(head), 2.0 * cmm, 0.5 * _REACH_MM) is None:
        return None
    got = _rests(head, cmm)
    if got is None:
        return None
    core, rest, sd, din, reaches = got
    zone = ndi.binary_dilation(rest, iterations=_ZONE_VOX)
    material = None
    if vals is not None:
        material = _material(rest, core, din, vals, air, cmm)
        if material is not None:
            grown, mid, sign, half = material
            rest = rest | grown
            material = (ndi.binary_dilation(grown), mid, sign, half)
    return RestCut(box=(slice(None),) * 3, rest=rest, zone=zone, sd=sd, reach_mm=reaches, material=material)


def _material(rest, core, din, vals, air: float, cmm):
    """Where the rest lies flat on the skin, the opening keeps some of it in the core (a ball fits
    across skin and rest); a CT rest is another material than skin (plastic 100-300 HU, foam
    -300..-100; skin 20-60), so grow the rest into the core through voxels of its own material
    (nearer the rest's level than the skin's, and no further beyond it), at most ``2 * _OPEN_MM``
    from the air (``din``: distance to the air, mm). Returns (grown, mid, sign, half) or None when the two do not differ by
    ``_MIN_MATERIAL`` of the skin/air contrast (``half``: half their difference).
    """
    from scipy import ndimage as ndi

    c = float(np.max(cmm))
    # the rest's material: its own voxels 1.5-3.5 voxels from the core (the
    # part that touches the head, clear of the interface's partial volume);
    # the skin's: the core's second layer of voxels (the scalp: the
    # threshold's "skin" shell reaches the skull, which a CT shows bright)
    d_core = ndi.distance_transform_edt(~core, sampling=cmm)
    src = rest & (d_core > 1.5 * c) & (d_core <= 3.5 * c)
    if np.count_nonzero(src) < 64:
        src = rest
    rest_val = float(np.median(vals[src]))
    eroded = ndi.binary_erosion(core)
    layer = eroded & ~ndi.binary_erosion(eroded)
    if np.count_nonzero(layer) < 64:
        return None
    skin = float(np.median(vals[layer]))
    if abs(rest_val - skin) < _MIN_MATERIAL * abs(skin - air):
        return None
    sign = 1.0 if rest_val > skin else -1.0
    # the rest's side of midway, and no further beyond the rest than the
    # skin is on the other side (keeps bone out when the rest is plastic)
    dv = (vals - rest_val) * sign
    like = (dv > -0.5 * abs(rest_val - skin)) & (dv < abs(rest_val - skin))
    # the rest kept in the core is at most a ball's diameter from the air
    cand = core & like & (din <= 2.0 * _OPEN_MM)
    grown = ndi.binary_propagation(ndi.binary_dilation(rest) & cand, mask=cand)
    if not grown.any():
        return None
    return grown, 0.5 * (rest_val + skin), sign, 0.5 * abs(rest_val - skin)


def _linear_axis(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``pos`` (clamped)."""
    last = a.shape[axis] - 1
    pos = np.clip(pos, 0.0, last)
    i0 = np.minimum(np.floor(pos).astype(np.int64), max(last - 1, 0))
    t = (pos - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = pos.size
    t = t.reshape(shape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, np.minimum(i0 + 1, last), axis=axis)
    return lo + (hi - lo) * t


def rest_cap(cut: RestCut, k, grid, level: float, span: float, h_mm: float):
    """Cap values for the fine field inside the rest zone.

    Parameters
    ----------
    cut : RestCut
        With ``box`` set to its place in the full coarse array.
    k : (3,) int
        Block factors (original voxels per coarse voxel).
    grid
        The work grid (``lo``, ``step``, ``shape``: work index j -> original index lo + j * step).
    level : float
        The iso-level.
    span : float
        Skin minus air (the field's contrast).
    h_mm : float
        Work grid spacing (mm).

    Returns
    -------
    (slices, cap, where, material) or None
        ``slices`` into the (unpadded) work grid; ``cap`` float32 and
        ``where`` bool of that box's shape: the field becomes
        ``min(field, cap)`` where ``where``. The cap crosses ``level`` on the
        core's boundary, with the slope of a one-voxel skin edge.
        ``material``: None, or (mwhere, mid, gain): where ``mwhere`` the
        field F also becomes ``min(F, level - gain * (F - mid))``.
    """
    k = np.asarray(k)
    mat = cut.material
    any_zone = cut.zone if mat is None else cut.zone | mat[0]
    idx = np.argwhere(any_zone)
    if idx.size == 0:
        return None
    # the zone's box (plus one coarse voxel for the interpolation), in box and in array indices
    b_lo = np.maximum(idx.min(0) - 1, 0)
    b_hi = np.minimum(idx.max(0) + 2, cut.zone.shape)
    bsl = tuple(slice(int(a), int(b)) for a, b in zip(b_lo, b_hi))
    zone, sd = cut.zone[bsl], cut.sd[bsl]
    mzone = None if mat is None else mat[0][bsl]
    c0 = np.array([b.start or 0 for b in cut.box]) + b_lo
    lo_c, hi_c = idx.min(0) + c0 - b_lo, idx.max(0) + c0 - b_lo + 1
    sls, pos, near = [], [], []
    for ax in range(3):
        o = grid.lo[ax] + grid.step[ax] * np.arange(grid.shape[ax])
        # work voxels whose coarse voxel lies in the zone's box
        c = np.floor((o + 0.5) / k[ax]).astype(np.int64)
        j = np.flatnonzero((c >= lo_c[ax]) & (c < hi_c[ax]))
        if j.size == 0:
            return None
        sls.append(slice(int(j[0]), int(j[-1]) + 1))
        oo = o[j[0]:j[-1] + 1]
        # coarse voxel c's centre is original index c*k + (k-1)/2
        pos.append((oo - 0.5 * (k[ax] - 1)) / k[ax] - c0[ax])
        near.append(np.clip(np.floor((oo + 0.5) / k[ax]).astype(np.int64) - c0[ax], 0, zone.shape[ax] - 1))
    for ax in range(3):
        sd = _linear_axis(sd, ax, pos[ax])
    where = zone
    for ax in range(3):
        where = np.take(where, near[ax], axis=ax)
    cap = (np.float32(level) - np.float32(span / h_mm) * sd).astype(np.float32)
    material = None
    if mat is not None:
        mwhere = mzone
        for ax in range(3):
            mwhere = np.take(mwhere, near[ax], axis=ax)
        # the material cap crosses the level midway between skin and rest
        # and swings by +-span over their difference
        material = (mwhere, float(mat[1]), float(mat[2]) * span / float(mat[3]))
    return tuple(sls), cap, where, material
