"""The dispatcher between callers and backends: :func:`rasterize`, :func:`resolve_backend`.

Turns the caller's meshes, cameras and ``backend=`` / ``device=`` choices into
a :class:`~mriface.render.backends.Scene` on the right device, asks the chosen
backend (:mod:`mriface.render.backends`) for its hits and returns them as
:class:`~mriface.render.fragments.Fragments`. It names no backend: the
registry does.
"""

from __future__ import annotations

import torch

from .._device import resolve_device
from ..errors import BackendError
from .backends import Backend, Scene, auto_backend, available_backends, get_backend
from .cameras import Cameras
from .fragments import Fragments, hits_to_fragments

__all__ = ["rasterize", "resolve_backend", "select_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"zbuffer"`` on CUDA, ``"embree"`` on the CPU; any other name is checked against the registry.

    Raises
    ------
    BackendError
        For a name no backend is registered under (the message lists them).
    """
    if backend == "auto":
        return auto_backend(device)
    if backend not in available_backends():
        get_backend(backend)  # raises, listing the registered backends
    return backend


def select_backend(backend: str, device) -> "tuple[Backend, torch.device]":
    """The backend instance and compute device for a user's ``backend=`` and ``device=``.

    ``device="auto"`` (or None) means the backend's ``default_device``
    (CUDA when present for zbuffer and pytorch3d; the CPU for embree); with
    ``backend="auto"`` the device decides the backend (:func:`resolve_backend`).
    """
    if backend == "auto":
        dev = resolve_device(device)
        return get_backend(resolve_backend(backend, dev)), dev
    impl = get_backend(backend)
    auto = device is None or (isinstance(device, str) and device == "auto")
    return impl, resolve_device(impl.default_device if auto else device)


def make_scene(verts, faces, cameras: Cameras, image_size: int, *, mesh_index=None, device="cpu") -> Scene:
    """A :class:`Scene` on ``device`` from one mesh (seen by every camera) or lists of meshes plus ``mesh_index``.

    Raises
    ------
    BackendError
        If the number of meshes (or ``mesh_index`` entries) does not fit the cameras.
    """
    dev = torch.device(device)
    if isinstance(verts, torch.Tensor):
        verts_list, faces_list = [verts], [torch.as_tensor(faces)]
        mesh_index = torch.zeros(len(cameras), dtype=torch.int64)
    else:
        verts_list = [torch.as_tensor(v) for v in verts]
        faces_list = [torch.as_tensor(f) for f in faces]
        if mesh_index is None:
            if len(verts_list) != len(cameras):
                raise BackendError(
                    f"rasterize got {len(verts_list)} meshes for {len(cameras)} cameras: "
                    "pass mesh_index=(which mesh each camera sees)"
                )
            mesh_index = torch.arange(len(cameras))
        mesh_index = torch.as_tensor(mesh_index, dtype=torch.int64).cpu()
    if len(mesh_index) != len(cameras):
        raise BackendError(f"mesh_index has {len(mesh_index)} entries for {len(cameras)} cameras: give one per camera")
    return Scene(tuple(v.to(dev) for v in verts_list), tuple(f.to(dev, torch.int64) for f in faces_list),
                 mesh_index, cameras.to(dev), int(image_size))


def rasterize(
    verts,
    faces,
    cameras: Cameras,
    image_size: int,
    *,
    backend: str = "auto",
    mesh_index=None,
    device="auto",
    **backend_options,
) -> Fragments:
    """Find the visible triangle, barycentrics and depth at every pixel centre.

    Parameters
    ----------
    verts : torch.Tensor or sequence of torch.Tensor
        (V, 3) vertex positions, world RAS+ mm, of one mesh seen by every
        camera; or a list of M such tensors (one per mesh) together with
        ``mesh_index``. Gradients flow from the returned ``bary`` / ``depth``
        to ``verts`` on every built-in backend (zbuffer and embree: away from silhouettes).
    faces : torch.Tensor or sequence of torch.Tensor
        (F, 3) int64 triangle vertex indices (or a list matching ``verts``).
    cameras : Cameras
        N cameras (see :mod:`mriface.render.cameras` for conventions).
    image_size : int
        Square image side S, pixels.
    backend : str
        ``"auto"`` (zbuffer on CUDA, embree on the CPU) or a name in
        :func:`~mriface.render.available_backends`.
    mesh_index : array_like of int, optional
        (N,) which mesh camera ``n`` sees, when lists are given.
    device : str or torch.device
        Where the returned fragments live ('auto' = the backend's default
        device: CUDA when present, the CPU for embree).
    **backend_options
        Passed to the backend's ``hits`` (pytorch3d: ``bin_size``, ``max_faces_per_bin``;
        zbuffer: ``max_candidates``; embree: ``bvh``, ``cull_backfaces``, ``threads``).

    Returns
    -------
    Fragments
        With ``pix_to_face`` indexing ``faces`` (or the faces of
        :func:`~mriface.render.concat_meshes` applied to the lists).
    """
    impl, dev = select_backend(backend, device)
    scene = make_scene(verts, faces, cameras, image_size, mesh_index=mesh_index, device=dev)
    return hits_to_fragments(impl.hits(scene, **backend_options))
