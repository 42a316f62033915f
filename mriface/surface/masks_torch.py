"""Torch twins of the threshold and head-mask steps (steps 1-3 of ``docs/surface.md``), any device.

Used by :func:`~mriface.surface.extract_head_surface` when ``engine="torch"``
(the default on CUDA), so that the volume goes to the device once and the
masks never come back. Same steps and parameters as :mod:`.masks`; the binary
morphology is done by shifted slices (scipy's default cross-shaped structure,
iterated), connected components and hole filling by hook-and-compress labelling
(:func:`_roots`, :func:`_label`). Block means are the same float32 additions in the same
order, so the coarse grid is bit-identical to numpy's; medians, percentiles
and Otsu's threshold agree to float rounding, so a voxel whose block mean
lies within rounding of a level may land on the other side (the tests bound
how many).

Small scalars (levels, bounding boxes, counts) are read back to drive the
steps. The head-rest check (:mod:`.headrest`, distance transforms) runs on the
host: its 2x-pooled first look reads back the pooled filled mask (1/8 of the
coarse grid's voxels, bits), and only when that finds a rest (a CT head lying
in a cradle) the full-resolution check reads the coarse mask and block means.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import SurfaceError
from ..volume import Volume
from .masks import _MIN_CONTRAST, _MIN_HEAD_MM3, ThresholdEstimate, _block_factors, _HeadMasks

__all__: "list[str]" = []


def _block_mean_torch(data, k):
    """:func:`.masks._block_mean` on a tensor: the same additions in the same order (same bits)."""
    import torch.nn.functional as F

    pad = [(-s) % kk for s, kk in zip(data.shape, k)]
    if any(pad):
        # F.pad counts from the last axis; replicate needs a batch and a channel axis
        data = F.pad(data[None, None], (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")[0, 0]
    out = data
    for ax, kk in enumerate(k):
        if kk == 1:
            continue
        sl = [slice(None)] * 3
        sl[ax] = slice(0, None, kk)
        acc = out[tuple(sl)].float().clone()
        for j in range(1, kk):
            sl[ax] = slice(j, None, kk)
            acc += out[tuple(sl)]
        out = acc
    if out is data:
        return data.float().clone()
    out *= np.float32(1.0 / (k[0] * k[1] * k[2]))
    return out


# ---------------------------------------------------------------- binary morphology (cross structure)
def _shift_or(x, y, axes=(0, 1, 2)):
    """``y |= x`` shifted by +-1 voxel along each of ``axes`` (in place); returns ``y``."""
    for ax in axes:
        n = x.shape[ax]
        if n < 2:
            continue
        y.narrow(ax, 1, n - 1).logical_or_(x.narrow(ax, 0, n - 1))
        y.narrow(ax, 0, n - 1).logical_or_(x.narrow(ax, 1, n - 1))
    return y


def _dilate(x, iterations: int = 1, mask=None):
    """``scipy.ndimage.binary_dilation(x, iterations=, mask=)`` with the default (6-neighbour) structure."""
    for _ in range(iterations):
        y = _shift_or(x, x.clone())
        x = y if mask is None else (y & mask) | x
    return x


def _erode(x, iterations: int = 1, border_value: int = 0):
    """``scipy.ndimage.binary_erosion(x, iterations=, border_value=)``, default structure."""
    for _ in range(iterations):
        y = x.clone()
        for ax in range(3):
            n = x.shape[ax]
            if n >= 2:
                y.narrow(ax, 1, n - 1).logical_and_(x.narrow(ax, 0, n - 1))
                y.narrow(ax, 0, n - 1).logical_and_(x.narrow(ax, 1, n - 1))
            if not border_value:
                y.narrow(ax, 0, 1).zero_()
                y.narrow(ax, n - 1, 1).zero_()
        x = y
    return x


# ---------------------------------------------------------------- connected components
def _roots(n: int, ea, eb):
    """Connected components of a graph on nodes ``0..n-1`` with edges ``(ea[i], eb[i])``.

    Returns an int64 tensor (n,): each node's component root, the smallest
    node in its component. Hook and compress (Shiloach-Vishkin): each node
    points to a parent with a smaller index; every round, for each edge whose
    ends' roots differ, the larger root is hooked under the smaller (a
    scatter-min), and then the pointers are jumped until each points at its
    root. Rounds grow with the log of a component's size, not with its
    diameter, and each is a few gathers and one scatter: fast on a GPU.
    """
    import torch

    parent = torch.arange(n, device=ea.device, dtype=torch.int64)
    while ea.numel():
        ra, rb = parent[ea], parent[eb]
        split = torch.nonzero(ra != rb).reshape(-1)
        if not split.numel():
            break
        # only edges still split need looking at again (trees only ever merge)
        ea, eb, ra, rb = ea[split], eb[split], ra[split], rb[split]
        parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")
        while True:  # compress: every pointer to its root
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
    return parent


def _label(mask, axes=(0, 1, 2)):
    """Connected components of ``mask`` (6-neighbour, or 4-neighbour within slices: ``axes``).

    Every voxel of a component gets the same label (1 + the smallest rank,
    in flat order among the mask's voxels, of its voxels); background is 0.
    The mask's voxels are the nodes and neighbouring pairs the edges of
    :func:`_roots`.
    """
    import torch

    shape = mask.shape
    # work on the mask's voxels only, numbered 0..n-1 in flat order (ids: flat -> voxel number)
    ids = torch.cumsum(mask.reshape(-1), 0, dtype=torch.int64).reshape(shape) - 1
    n = int(ids.reshape(-1)[-1]) + 1 if mask.numel() else 0
    ea, eb = [], []
    for ax in axes:
        size = shape[ax]
        if size < 2:
            continue
        # one nonzero per axis (CPU nonzero is the slow part), then two gathers
        at = torch.nonzero((mask.narrow(ax, 0, size - 1) & mask.narrow(ax, 1, size - 1)).reshape(-1)).reshape(-1)
        ea.append(ids.narrow(ax, 0, size - 1).reshape(-1)[at])
        eb.append(ids.narrow(ax, 1, size - 1).reshape(-1)[at])
    empty = torch.zeros(0, dtype=torch.int64, device=mask.device)
    root = _roots(n, torch.cat(ea) if ea else empty, torch.cat(eb) if eb else empty)
    return torch.where(mask, (root + 1)[ids.clamp(min=0)], 0)


def _largest(mask):
    """The largest 6-connected object of ``mask`` (bool), or None when ``mask`` is empty."""
    import torch

    lab = _label(mask)
    fg = lab[mask]
    if fg.numel() == 0:
        return None
    ids, counts = torch.unique(fg, return_counts=True)
    return lab == ids[torch.argmax(counts)]


def _fill_holes(mask, axis: "int | None"):
    """:func:`.masks._fill_holes` on a tensor: background not connected to the border becomes ``mask``."""
    import torch

    axes = tuple(a for a in range(3) if a != axis)
    lab = _label(~mask, axes)
    faces = [lab.select(ax, i).reshape(-1) for ax in axes for i in (0, -1)]
    outside = torch.unique(torch.cat(faces))
    return mask | ~torch.isin(lab, outside)


def _filled(head):
    filled = _fill_holes(head, None)
    for axis in range(3):
        filled |= _fill_holes(head, axis)
    return filled


def _box(mask, margin: int) -> "tuple[slice, slice, slice]":
    """Slices of the bounding box of ``mask`` grown by ``margin``, clipped (one small read-back)."""
    import torch

    box = []
    for ax in range(3):
        hit = mask.any(dim=[a for a in range(3) if a != ax])
        nz = torch.nonzero(hit).reshape(-1)
        lo, hi = int(nz[0]), int(nz[-1])
        box.append(slice(max(0, lo - margin), min(mask.shape[ax], hi + 1 + margin)))
    return tuple(box)


# ---------------------------------------------------------------- threshold and head masks
def _median(x) -> float:
    """``numpy.median`` of a 1D tensor (the mean of the two middle values for an even count)."""
    n = x.numel()
    if n % 2:
        return float(x.kthvalue(n // 2 + 1).values)
    s = x.kthvalue(n // 2).values.double() + x.kthvalue(n // 2 + 1).values.double()
    return float(s / 2)


def _otsu_torch(values) -> float:
    """``skimage.filters.threshold_otsu(values, nbins=256)`` on a 1D float tensor."""
    import torch

    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    hist = torch.histc(values.double(), bins=256, min=lo, max=hi)
    edges = torch.linspace(lo, hi, 257, dtype=torch.float64, device=values.device)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w1 = torch.cumsum(hist, 0)
    w2 = torch.cumsum(hist.flip(0), 0).flip(0)
    m1 = torch.cumsum(hist * centers, 0) / w1
    m2 = (torch.cumsum((hist * centers).flip(0), 0) / w2.flip(0)).flip(0)
    var12 = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[torch.argmax(torch.nan_to_num(var12, nan=-1.0))])


def estimate_threshold_torch(volume: Volume, coarse_t, k_seg, coarse_mm: float = 2.0, data=None) -> ThresholdEstimate:
    """:func:`.masks.estimate_threshold` from the segmentation grid's block means on the device.

    ``coarse_t``: :func:`_block_mean_torch` of the volume with factors ``k_seg``;
    ``data``: the volume on the device, needed when the threshold grid's
    blocks are not whole multiples of the segmentation grid's (else it is
    copied there from ``volume``).
    """
    import torch

    k = _block_factors(volume.zooms, 2.0 * coarse_mm)
    if all(kk % kc == 0 for kk, kc in zip(k, k_seg)):
        coarse = _block_mean_torch(coarse_t, tuple(kk // kc for kk, kc in zip(k, k_seg)))
    else:
        if data is None:
            data = torch.as_tensor(np.ascontiguousarray(volume.data, dtype=np.float32)).to(coarse_t.device)
        coarse = _block_mean_torch(data, k)
    cmm = float((np.asarray(k) * volume.zooms).min())
    q = torch.quantile(coarse.reshape(-1).double(), torch.tensor([0.005, 0.995], dtype=torch.float64,
                                                                  device=coarse.device))
    lo, hi = float(q[0]), float(q[1])
    t = _otsu_torch(coarse.reshape(-1).clamp(lo, hi))
    r_air = max(1, int(round(6.0 / cmm)))
    r_skin = max(2, int(round(6.0 / cmm)))
    for _ in range(2):
        rough = coarse > t
        air_vox = coarse[~_dilate(rough, r_air)]
        shell = _erode(rough, 1) & ~_erode(rough, r_skin)
        skin_vox = coarse[shell]
        if air_vox.numel() < 64 or skin_vox.numel() < 64:
            raise SurfaceError(
                f"{volume.name}: no head found (no air around an object, or no object): "
                "is this a head scan with air around the head?"
            )
        air, skin = _median(air_vox), _median(skin_vox)
        t = 0.5 * (air + skin)
    if volume.modality == "ct":
        t = float(np.clip(t, -500.0, -200.0))
    spread = 1.4826 * _median((air_vox - air).abs())
    contrast = (skin - air) / max(spread, 1e-3 * abs(skin - air), 1e-30)
    return ThresholdEstimate(threshold=float(t), air=air, skin=skin, contrast=float(contrast))


def _head_masks_torch(volume: Volume, est: ThresholdEstimate, coarse_mm: float, coarse) -> _HeadMasks:
    """:func:`.masks._head_masks` on the device; the returned masks are bool tensors (rest: numpy)."""
    import torch

    from .headrest import _REACH_MM, _rests, split_rest

    k = _block_factors(volume.zooms, coarse_mm)
    cmm = np.asarray(k) * volume.zooms
    mask = coarse > est.air + 0.5 * (est.threshold - est.air)
    opened = _dilate(_erode(mask, 1), 1)
    big = _largest(opened)
    if big is None:
        raise SurfaceError(f"{volume.name}: no head found: nothing above the skin threshold {est.threshold:g}")
    r_grow = max(1, int(round(20.0 / cmm.min())))
    r_in = max(1, int(np.ceil(4.0 / cmm.min())))
    r_out = max(1, int(np.ceil(6.0 / cmm.min())))
    grow_box = _box(big, r_grow)
    head = torch.zeros_like(mask)
    head[grow_box] = _dilate(big[grow_box], r_grow, mask=mask[grow_box])
    crop = _box(head, r_out + 1)
    head_c = head[crop]
    head_mm3 = float(int(torch.count_nonzero(head_c)) * np.prod(cmm))
    if est.contrast < _MIN_CONTRAST or head_mm3 < _MIN_HEAD_MM3:
        raise SurfaceError(
            f"{volume.name}: no head found (air/tissue contrast {est.contrast:.1f}, largest object "
            f"{head_mm3 / 1000:.0f} cm^3); is this a head scan? Give a volume showing the whole face"
        )
    filled = _filled(head_c)
    rest = None
    # the head-rest check's cheap first look on the host (the same gate split_rest applies first):
    # only the 2x any-pooled mask comes back; every MR head stops here
    if _rests(_pool2_torch(filled).cpu().numpy(), 2.0 * np.asarray(cmm, float), 0.5 * _REACH_MM) is not None:
        rest = split_rest(filled.cpu().numpy(), cmm, coarse[crop].cpu().numpy(), est.air)
    if rest is not None:
        rest = replace(rest, box=crop)
        head_c = _largest(head_c & ~torch.from_numpy(rest.rest).to(head_c.device))
        head[crop] = head_c
        filled = _filled(head_c)
    interior_c = _erode(filled, r_in, border_value=1)
    exterior_c = ~_dilate(filled, r_out)
    interior = torch.zeros_like(mask)
    exterior = torch.ones_like(mask)
    interior[crop], exterior[crop] = interior_c, exterior_c
    if rest is not None:
        ic = interior_c.cpu().numpy()
        mat = rest.material
        if mat is not None:
            mat = (mat[0] & ~ic,) + tuple(mat[1:])
        rest = replace(rest, zone=rest.zone & ~ic, material=mat)
    return _HeadMasks(head=head, interior=interior, exterior=exterior, k=k, rest=rest)


def _pool2_torch(mask):
    """:func:`.headrest._pool2` on a tensor: any over 2x2x2 blocks, edge-padded to whole blocks."""
    import torch.nn.functional as F

    pad = [s % 2 for s in mask.shape]
    x = mask[None, None].float()
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    return F.max_pool3d(x, 2)[0, 0] > 0.5
