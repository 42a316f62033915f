"""mriface: can a de-identified head scan be re-identified by face recognition?

The data flow, one module per stage::

    scan file -> Volume -> HeadSurface -> renders -> aligned faces -> embeddings -> ranks -> report
                 volume     surface       render/     recognition/                  match    study

The names below are imported lazily, so ``import mriface`` stays fast and a
stage's heavy dependencies load only when that stage is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    BackendError,
    DataUnavailableError,
    InputFileError,
    ManifestError,
    MRIFaceError,
    SurfaceError,
    TransformError,
    VolumeError,
    WeightsError,
)
from .errors import __all__ as _ERROR_NAMES

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "Volume": "volume",
    "load_volume": "volume",
    "FaceFrame": "surface",
    "HeadSurface": "surface",
    "extract_head_surface": "surface",
    "load_surface": "surface",
    "save_surface": "surface",
    "RenderProtocol": "render",
    "RenderBatch": "render",
    "render_views": "render",
    "run_study": "study",
    "datasets": "datasets",
    "match": "match",
    "recognition": "recognition",
    "render": "render",
}

__all__ = [
    "__version__",
    *_ERROR_NAMES,  # errors.__all__: the error classes, imported eagerly above
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = module if name == _LAZY[name] else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mriface' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
