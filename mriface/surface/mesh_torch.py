"""Torch twins of the mesh clean-up steps (largest piece, winding test, vertex normals), any device.

Used by :func:`~mriface.surface.extract_head_surface` when ``engine="torch"``,
so that the mesh made by :func:`~mriface.surface.marching_cubes_torch` stays on
the device until the face frame is found and leaves it once, finished.
Same results as :mod:`.mesh` for the same input (kept faces and vertex order;
the normals to float rounding).
"""

from __future__ import annotations

__all__: "list[str]" = []


def _largest_component_torch(verts, faces):
    """:func:`.mesh._largest_component` on tensors: the piece with the most faces, unused vertices dropped.

    Ties go to the piece whose smallest vertex index is smallest (as scipy's
    component numbering does in the numpy twin).
    """
    import torch

    from .masks_torch import _roots

    n = verts.shape[0]
    if faces.shape[0] == 0:
        return verts, faces
    root = _roots(n, torch.cat([faces[:, 0], faces[:, 1]]), torch.cat([faces[:, 1], faces[:, 2]]))
    face_root = root[faces[:, 0]]
    counts = torch.bincount(face_root, minlength=n)
    if int(torch.count_nonzero(counts)) > 1:
        faces = faces[face_root == torch.argmax(counts)]
    return _compact_torch(verts, faces)


def _compact_torch(verts, faces):
    """Drop vertices no face uses; renumber faces (order kept)."""
    import torch

    used = torch.zeros(verts.shape[0], dtype=torch.bool, device=verts.device)
    used[faces.reshape(-1)] = True
    if bool(used.all()):
        return verts, faces
    remap = torch.cumsum(used, 0) - 1
    return verts[used], remap[faces]


def _outward_torch(verts, faces) -> bool:
    """:func:`.mesh._outward` on tensors: the faces around the vertex furthest along +x face +x."""
    import torch

    i = torch.argmax(verts[:, 0])
    around = faces[(faces == i).any(dim=1)]
    v = verts.double()
    fn = torch.linalg.cross(v[around[:, 1]] - v[around[:, 0]], v[around[:, 2]] - v[around[:, 0]])
    return bool(fn[:, 0].sum() > 0)


def vertex_normals_torch_f64(verts, faces):
    """:func:`.mesh.vertex_normals_np` on tensors: area-weighted unit normals, (V, 3) float32.

    Summed in float64 like the numpy twin; a vertex whose normals cancel gets +z.
    """
    import torch

    v = verts.double()
    p0 = v[faces[:, 0]]
    fn = torch.linalg.cross(v[faces[:, 1]] - p0, v[faces[:, 2]] - p0)
    # corner slot-major order: face f's three corners are f, F + f, 2F + f
    n = torch.zeros_like(v).index_add_(0, faces.T.reshape(-1), fn.repeat(3, 1))
    norm = torch.linalg.norm(n, dim=1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=v.dtype, device=v.device)
    return torch.where(norm > 0, n / norm.clamp(min=1e-30), up).float()
