"""Renderer backends: the :class:`Backend` contract, the registry, and the three built-ins.

==============  ==========================  ===========================================
name            computes on (``"auto"``)    module
==============  ==========================  ===========================================
``zbuffer``     CUDA when present, else CPU :mod:`mriface.render.backends.zbuffer`
``embree``      CPU only                    :mod:`mriface.render.backends.embree`
``pytorch3d``   CUDA when present, else CPU :mod:`mriface.render.backends.pytorch3d`
==============  ==========================  ===========================================

``backend="auto"`` means zbuffer on CUDA and embree on the CPU. A new backend
is one class with ``name``, ``default_device``, ``batches_meshes`` and
``hits(scene, **options)``, registered with :func:`register_backend`; see
``docs/render.md``, "Adding a backend".
"""

from __future__ import annotations

import torch

from .base import Backend, Scene, available_backends, get_backend, register_backend, unregister_backend
from .embree import EmbreeBackend
from .pytorch3d import Pytorch3DBackend
from .zbuffer import ZBufferBackend

__all__ = ["Backend", "Scene", "register_backend", "unregister_backend", "get_backend", "available_backends",
           "auto_backend", "describe_backends", "ZBufferBackend", "EmbreeBackend", "Pytorch3DBackend"]

register_backend("zbuffer", ZBufferBackend)
register_backend("embree", EmbreeBackend)
register_backend("pytorch3d", Pytorch3DBackend)

#: what backend="auto" means, per device type (any other type: the CPU choice)
_AUTO = {"cuda": "zbuffer", "cpu": "embree"}


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``: zbuffer on CUDA, embree on the CPU."""
    return _AUTO.get(torch.device(device).type, _AUTO["cpu"])


def describe_backends() -> str:
    """One line for help texts: what ``auto`` means and every registered name."""
    names = available_backends()
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
    return f"auto ({_AUTO['cuda']} on CUDA, {_AUTO['cpu']} on the CPU), {listed}"
