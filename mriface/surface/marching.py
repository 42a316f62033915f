"""Marching cubes: a torch implementation (CPU and CUDA) and scikit-image's on the CPU."""

from __future__ import annotations

import numpy as np

__all__ = ["marching_cubes_torch"]



#: Bourke's cube corner numbering: corner i sits at this (dx, dy, dz) offset
_CORNERS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]],
    dtype=np.int64,
)
#: Bourke's edge numbering: edge e joins these two corners
_EDGES = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]],
    dtype=np.int64,
)


def marching_cubes_torch(field, level: float):
    """Marching cubes in torch (CPU or CUDA), Bourke's 256-case table.

    The table (``pytorch3d.ops.marching_cubes_data.FACE_TABLE``) treats each
    ambiguous cube face the same way from both cubes that share it, so the
    mesh is closed wherever the field is; vertices are shared through unique
    grid-edge ids. Run in plain torch ops so that CPU and CUDA give the same
    mesh.

    Parameters
    ----------
    field : torch.Tensor
        (X, Y, Z) float32 scalar field; inside is ``field > level``.
    level : float
        Iso-level.

    Returns
    -------
    verts : torch.Tensor
        (V, 3) float32 positions in voxel index units (axis order X, Y, Z).
    faces : torch.Tensor
        (F, 3) int64; orientation consistent over the mesh (its sign is
        fixed by the caller).
    """
    import torch
    from pytorch3d.ops.marching_cubes_data import FACE_TABLE

    dev = field.device
    X, Y, Z = field.shape
    below = field < level
    code = torch.zeros((X - 1, Y - 1, Z - 1), dtype=torch.int64, device=dev)
    for i, (dx, dy, dz) in enumerate(_CORNERS.tolist()):
        code |= below[dx:X - 1 + dx, dy:Y - 1 + dy, dz:Z - 1 + dz].long() << i
    active = (code != 0) & (code != 255)
    cells = torch.nonzero(active)  # (M, 3)
    cc = code[active]
    table = np.full((256, 15), -1, dtype=np.int64)
    for c, row in enumerate(FACE_TABLE):
        table[c, : len(row)] = row
    table_t = torch.from_numpy(table).to(dev)
    tri = table_t[cc].reshape(-1, 5, 3)  # (M, 5, 3) local edge ids
    valid = tri[:, :, 0] >= 0
    cell_of_tri = cells[:, None, :].expand(-1, 5, -1)[valid]  # (T, 3)
    tri = tri[valid]  # (T, 3)
    # a grid edge is (its lower corner, its axis); local edge -> that pair
    corners = torch.from_numpy(_CORNERS).to(dev)
    edges = torch.from_numpy(_EDGES).to(dev)
    a_off = corners[edges[:, 0]]
    b_off = corners[edges[:, 1]]
    low_off = torch.minimum(a_off, b_off)  # (12, 3)
    axis = torch.argmax((a_off - b_off).abs(), dim=1)  # (12,)
    base = cell_of_tri[:, None, :] + low_off[tri]  # (T, 3, 3) grid point
    gid = ((base[..., 0] * Y + base[..., 1]) * Z + base[..., 2]) * 3 + axis[tri]
    uniq, inverse = torch.unique(gid.reshape(-1), return_inverse=True)
    faces = inverse.reshape(-1, 3)
    ax = uniq % 3
    p = uniq // 3
    p0 = torch.stack([p // (Y * Z), (p // Z) % Y, p % Z], dim=1)
    unit = torch.nn.functional.one_hot(ax, 3)
    p1 = p0 + unit
    f0 = field[p0[:, 0], p0[:, 1], p0[:, 2]]
    f1 = field[p1[:, 0], p1[:, 1], p1[:, 2]]
    t = ((level - f0) / (f1 - f0)).clamp(0.0, 1.0)
    verts = p0.float() + unit.float() * t[:, None]
    return verts, faces


def _marching_cubes_np(field: np.ndarray, level: float):
    """scikit-image's Lewiner marching cubes.

    Not restricted with its ``mask=``: in scikit-image 0.26 a mask left
    holes in the surface even where it covered every crossing cube.
    """
    from skimage import measure

    verts, faces, _, _ = measure.marching_cubes(field, level, allow_degenerate=True)
    return verts.astype(np.float32), faces.astype(np.int64)
