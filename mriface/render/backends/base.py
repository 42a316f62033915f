"""The backend contract: a :class:`Scene` in, :class:`~mriface.render.fragments.Hits` out; and the registry.

A backend is any object with four members (:class:`Backend`): its ``name``,
the ``default_device`` it computes on when the caller says ``device="auto"``,
whether it ``batches_meshes`` (can rasterize several subjects' meshes in one
call), and ``hits(scene, **options)``, which returns the visible triangle,
barycentrics and depth of every covered pixel. Everything before (cameras,
culling, chunking) and after (shading) is shared code, so a new backend is
this one method in one file (or a notebook cell) plus :func:`register_backend`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ...errors import BackendError
from ..cameras import Cameras
from ..fragments import Hits
from ..geometry import concat_meshes, pixel_rays, split_pixels

__all__ = ["Backend", "Scene", "register_backend", "unregister_backend", "get_backend", "available_backends"]


@dataclass(frozen=True, eq=False)
class Scene:
    """What a backend rasterizes: M meshes, N cameras, which mesh each camera sees, the image size.

    Attributes
    ----------
    verts_list : tuple of torch.Tensor
        M tensors (V_m, 3) float, world RAS+ mm, on the cameras' device.
    faces_list : tuple of torch.Tensor
        M tensors (F_m, 3) int64 vertex indices, on the cameras' device.
    mesh_index : torch.Tensor
        (N,) int64 on the CPU: the mesh camera ``n`` sees.
    cameras : Cameras
        The N cameras (see :mod:`mriface.render.cameras` for the conventions).
    image_size : int
        Square image side S, pixels.

    A backend's :class:`~mriface.render.fragments.Hits` index faces of
    :attr:`joined` (mesh ``m``'s rows start at ``face_offsets[m]``).
    """

    verts_list: tuple
    faces_list: tuple
    mesh_index: torch.Tensor
    cameras: Cameras
    image_size: int

    @property
    def n_images(self) -> int:
        """N, one image per camera."""
        return len(self.cameras)

    @property
    def device(self) -> torch.device:
        return self.cameras.device

    @property
    def dtype(self) -> torch.dtype:
        """float64 when a vertex tensor is float64, else float32."""
        return torch.float64 if any(v.dtype == torch.float64 for v in self.verts_list) else torch.float32

    @functools.cached_property
    def face_offsets(self) -> "list[int]":
        """First row of each mesh's faces in :attr:`joined`'s faces."""
        out = [0]
        for f in self.faces_list[:-1]:
            out.append(out[-1] + int(f.shape[0]))
        return out

    @functools.cached_property
    def joined(self):
        """(verts, faces) of all meshes joined (:func:`~mriface.render.concat_meshes`); the mesh itself for one."""
        if len(self.verts_list) == 1:
            return self.verts_list[0], self.faces_list[0]
        v, f, _ = concat_meshes(self.verts_list, self.faces_list)
        return v, f

    def views_of(self, mesh: int) -> torch.Tensor:
        """(K,) int64 CPU indices of the cameras that see mesh ``mesh``, increasing."""
        return torch.nonzero(self.mesh_index == mesh).flatten()

    def meshes_seen(self) -> "list[int]":
        """The meshes some camera sees, increasing."""
        return torch.unique(self.mesh_index).tolist()

    def requires_grad(self) -> bool:
        """Whether autograd is on and a vertex tensor or the cameras' R or T needs a gradient."""
        return torch.is_grad_enabled() and (
            any(v.requires_grad for v in self.verts_list) or self.cameras.R.requires_grad or self.cameras.T.requires_grad
        )

    def pixel_rays(self, pixel: torch.Tensor, dtype: "torch.dtype | None" = None):
        """(origins, dirs) (M, 3) of the rays through flat pixels ``pixel`` (camera-space z = 1: ``t`` = depth, mm)."""
        view, row, col = split_pixels(pixel, self.image_size)
        return pixel_rays(self.cameras, self.image_size, view, row, col, dtype or self.dtype)

    def empty_hits(self, dtype: "torch.dtype | None" = None) -> Hits:
        """Hits with no covered pixel (every ray missed)."""
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        dt = dtype or self.dtype
        return Hits(empty, empty.clone(), torch.zeros((0, 3), dtype=dt, device=self.device),
                    torch.zeros(0, dtype=dt, device=self.device), self.n_images, self.image_size)


@runtime_checkable
class Backend(Protocol):
    """A rasterizer that feeds mriface's shader.

    Attributes
    ----------
    name : str
        Its registry name.
    default_device : str
        Where it computes for ``device="auto"``: ``"auto"`` (CUDA when
        present, else the CPU) or a device name such as ``"cpu"``.
    batches_meshes : bool
        True if one call may hold several subjects' meshes (``render_views``
        then groups subjects up to ``batch_images``); False: one subject per call.
    """

    name: str
    default_device: str
    batches_meshes: bool

    def hits(self, scene: Scene, **options) -> Hits:
        """The visible triangle, barycentrics and depth of every covered pixel of ``scene``.

        ``options`` are the backend's own keywords (passed through
        :func:`~mriface.render.rasterize`). Faces index ``scene.joined``.
        Barycentrics and depth should be differentiable w.r.t. the vertices
        when ``scene.requires_grad()`` (at least away from silhouettes); a
        backend that cannot do that says so in its docstring.
        """
        ...


#: name -> factory; registration order is the listing order
_REGISTRY: "dict[str, Callable[[], Backend]]" = {}


def register_backend(name: str, factory: "Callable[[], Backend]", *, replace: bool = False) -> None:
    """Make ``factory()`` available as ``backend=name`` everywhere (render_views, rasterize, the CLI).

    Parameters
    ----------
    name : str
        The name users pass; not ``"auto"``.
    factory : callable
        Called with no arguments by :func:`get_backend`; returns a
        :class:`Backend` (a class with the four members works as is).
    replace : bool
        Allow replacing a backend registered under the same name.

    Raises
    ------
    BackendError
        For a bad name, a factory that is not callable, or a name already taken (without ``replace``).
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise BackendError(f"register_backend: name={name!r} cannot be a backend name: give a non-empty str other than 'auto'")
    if not callable(factory):
        raise BackendError(f"register_backend({name!r}): factory {factory!r} is not callable: pass a class or a function")
    if name in _REGISTRY and not replace:
        raise BackendError(f"register_backend: {name!r} is already a backend: pick another name or pass replace=True")
    _REGISTRY[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a registered backend (e.g. a test's toy backend); unknown names raise BackendError."""
    if name not in _REGISTRY:
        raise BackendError(f"unregister_backend: {name!r} is not registered (registered: {', '.join(_REGISTRY)})")
    del _REGISTRY[name]


def available_backends() -> "list[str]":
    """Names of the registered backends, in registration order (``"auto"`` is not one of them)."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """A new instance of the backend registered as ``name``.

    Raises
    ------
    BackendError
        If no backend has that name (the message lists the registered ones),
        or its factory does not return a :class:`Backend`.
    """
    if name not in _REGISTRY:
        raise BackendError(
            f"backend={name!r} is not a renderer backend: use 'auto' or one of "
            f"{', '.join(repr(n) for n in available_backends())} (mriface.render.available_backends()), "
            "or register your own with mriface.render.register_backend"
        )
    backend = _REGISTRY[name]()
    if not isinstance(backend, Backend):
        missing = [m for m in ("name", "default_device", "batches_meshes", "hits") if not hasattr(backend, m)]
        raise BackendError(f"backend {name!r}: its factory returned {type(backend).__name__}, which lacks "
                           f"{', '.join(missing)}: a backend needs name, default_device, batches_meshes and hits()")
    return backend
