"""The face-model seam: the crop a model needs, the :class:`Embedder` contract and the registry.

A face model is anything with the attributes and methods of :class:`Embedder`.
It says which crop it needs (a :class:`CropSpec`); the
:class:`~mriface.recognition.FaceAligner` cuts that crop from one MTCNN
detection, so that several models share one detection. Models are created by
name with :func:`get_model`; :func:`register_model` adds one (from a plug-in
module, a test or a notebook, without editing mriface). ``"facenet"`` is
registered when :mod:`mriface.recognition` is imported and is the default;
the other plug-ins shipped with mriface (:data:`BUILTIN_PLUGINS`) register
themselves on the first lookup.

See ``docs/recognition.md`` ("Adding a face model") for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from .._device import resolve_device
from ..errors import MRIFaceError

__all__ = [
    "ALIGNMENTS",
    "NORMALISATIONS",
    "CropSpec",
    "Embedder",
    "register_model",
    "get_model",
    "available_models",
    "DEFAULT_MODEL",
    "ARCFACE_TEMPLATE",
]

#: how a crop is cut from a detection (see :class:`CropSpec`)
ALIGNMENTS = ("box", "arcface")

#: pixel value maps applied to 0..255 RGB crops: name -> (offset, divisor), crop = (x - offset) / divisor
NORMALISATIONS: "dict[str, tuple[float, float]]" = {
    "fixed_standardization": (127.5, 128.0),  # FaceNet (facenet-pytorch's fixed_image_standardization)
    "arcface": (127.5, 127.5),                # insightface ArcFace models
    "raw255": (0.0, 1.0),                     # models that normalise inside (e.g. SFace)
}

#: insightface's five reference points of the 112x112 ArcFace crop, pixels (x, y), in MTCNN's
#: landmark order: left eye, right eye, nose tip, left and right mouth corners (image left/right)
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

#: the model used when none is named
DEFAULT_MODEL = "facenet"


@dataclass(frozen=True)
class CropSpec:
    """The face crop a model takes.

    Attributes
    ----------
    size : int
        Side of the square crop, pixels.
    alignment : {"box", "arcface"}
        ``"box"``: MTCNN's box plus facenet-pytorch's margin, resampled to the
        square (today's FaceNet crop). ``"arcface"``: the least-squares
        similarity transform taking MTCNN's five landmarks onto
        :data:`ARCFACE_TEMPLATE` (scaled by ``size / 112``).
    normalisation : str
        A key of :data:`NORMALISATIONS`: ``"fixed_standardization"``
        ``(x - 127.5) / 128``, ``"arcface"`` ``(x - 127.5) / 127.5`` or
        ``"raw255"`` (0..255 unchanged), applied to 0..255 RGB.

    Examples
    --------
    >>> CropSpec(112, "arcface", "arcface")
    CropSpec(size=112, alignment='arcface', normalisation='arcface')
    """

    size: int
    alignment: str
    normalisation: str

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 8:
            raise MRIFaceError(f"CropSpec size={self.size!r}: give an int of at least 8 pixels")
        if self.alignment not in ALIGNMENTS:
            raise MRIFaceError(f"CropSpec alignment={self.alignment!r}: use one of {', '.join(ALIGNMENTS)}")
        if self.normalisation not in NORMALISATIONS:
            raise MRIFaceError(
                f"CropSpec normalisation={self.normalisation!r}: use one of {', '.join(NORMALISATIONS)}"
            )

    def normalise(self, rgb255: torch.Tensor) -> torch.Tensor:
        """Map (N, 3, S, S) 0..255 RGB to this spec's model input."""
        offset, divisor = NORMALISATIONS[self.normalisation]
        return (rgb255 - offset) / divisor

    def as_dict(self) -> dict:
        """JSON-able form (for model ids and cache keys)."""
        return {"size": self.size, "alignment": self.alignment, "normalisation": self.normalisation}


#: FaceNet's crop: 160 px MTCNN box with margin, (x - 127.5) / 128
FACENET_CROP = CropSpec(160, "box", "fixed_standardization")
#: the standard ArcFace crop: 112 px on the five-point template, (x - 127.5) / 127.5
ARCFACE_CROP = CropSpec(112, "arcface", "arcface")


@runtime_checkable
class Embedder(Protocol):
    """What mriface needs from a face model.

    Attributes
    ----------
    name : str
        The registry name (``"facenet"``).
    dim : int
        Embedding size.
    crop : CropSpec
        The crop :meth:`embed` takes.
    licence : str
        SPDX id or short text of the weights' licence (printed and recorded).
    device : torch.device
        Where the network runs.
    """

    name: str
    dim: int
    crop: CropSpec
    licence: str
    device: torch.device

    def model_id(self) -> dict:
        """JSON-able identity for cache keys: name, the weights' verified SHA-256, crop, precision."""
        ...

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) crops as the aligner cuts them for :attr:`crop` -> (N, dim) float32, unit L2 norm."""
        ...


#: the precisions a built-in embedder computes in
EMBED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def embedder_settings(device: "str | torch.device", dtype: torch.dtype,
                      batch_size: int) -> "tuple[torch.device, torch.dtype, int]":
    """Check a built-in embedder's ``dtype`` and ``batch_size`` and resolve its ``device``.

    Shared by :class:`~mriface.recognition.facenet.FaceNetEmbedder` and
    :class:`~mriface.recognition.onnx_embed.OnnxEmbedder`; raises MRIFaceError naming the bad value.
    """
    if dtype not in EMBED_DTYPES:
        raise MRIFaceError(f"dtype={dtype}: use torch.float32, torch.float16 or torch.bfloat16")
    if batch_size < 1:
        raise MRIFaceError(f"batch_size={batch_size} must be >= 1")
    return resolve_device(device), dtype, int(batch_size)


Factory = Callable[..., Embedder]
#: plug-in modules shipped with mriface; each registers its models when imported. They are imported on
#: the first registry lookup, not with mriface.recognition, so that importing mriface stays cheap.
BUILTIN_PLUGINS = ("mriface.recognition.arcface", "mriface.recognition.sface")
# The registry is the one piece of module state the design allows: a name -> factory table that plug-ins
# extend at import time; it holds no models and no data.
_REGISTRY: "dict[str, Factory]" = {}


def register_model(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Make a face model available by name.

    Parameters
    ----------
    name : str
        Registry name (lower case, no spaces or commas; used by ``--model``).
    factory : callable
        ``factory(*, device, weights=None, random_weights=False, **kw) -> Embedder``.
    replace : bool
        Allow replacing an existing entry (otherwise a second registration of
        a name with a different factory is an error).
    """
    if not isinstance(name, str) or not name or any(c in name for c in " ,\t\n") or name != name.lower():
        raise MRIFaceError(f"model name {name!r}: use a lower-case name without spaces or commas")
    if not callable(factory):
        raise MRIFaceError(f"model {name!r}: factory {factory!r} is not callable")
    old = _REGISTRY.get(name)
    if old is not None and old is not factory and not replace:
        raise MRIFaceError(f"a face model named {name!r} is already registered: pick another name "
                           "or pass replace=True")
    _REGISTRY[name] = factory


def _load_builtins() -> None:
    import importlib
    import importlib.util

    for module in BUILTIN_PLUGINS:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def available_models() -> "list[str]":
    """Registered model names, sorted (mriface's own plug-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_model(name: str = DEFAULT_MODEL, *, device: "str | torch.device" = "auto", weights: object = None,
              random_weights: bool = False, **kw: object) -> Embedder:
    """Create the registered face model ``name``.

    Parameters
    ----------
    name : str
        A name from :func:`available_models`.
    device : str or torch.device
        ``"auto"`` = CUDA when present.
    weights : path-like, optional
        A weights file instead of the model's default.
    random_weights : bool
        An untrained network (timing without the weights; embeddings are meaningless).
    **kw
        Passed on to the factory (e.g. ``dtype=``, ``batch_size=``).

    Raises
    ------
    MRIFaceError
        ``name`` is not registered (the message lists the available ones).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        _load_builtins()
    factory = _REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None:
        raise MRIFaceError(f"unknown face model {name!r}: available models are "
                           f"{', '.join(available_models()) or '(none)'}")
    model = factory(device=device, weights=weights, random_weights=random_weights, **kw)
    missing = [a for a in ("name", "dim", "crop", "licence", "device", "model_id", "embed") if not hasattr(model, a)]
    if missing:
        raise MRIFaceError(f"face model {name!r}: its factory returned {type(model).__name__}, "
                           f"which lacks {', '.join(missing)} of the Embedder contract")
    if not isinstance(model.crop, CropSpec):
        raise MRIFaceError(f"face model {name!r}: crop is {model.crop!r}, not a CropSpec")
    return model
