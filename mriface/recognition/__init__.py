"""Face recognition: MTCNN alignment and face models behind one contract, offline.

* :class:`CropSpec`, :class:`Embedder`, :func:`register_model`,
  :func:`get_model`, :func:`available_models` - the face-model seam
  (:mod:`.models`); ``"facenet"`` is registered here and is the default.
* :class:`FaceAligner` - images (photographs or renders) -> :class:`Alignment`:
  one MTCNN detection per image, and the crop each model's :class:`CropSpec`
  asks for (``"box"`` or ``"arcface"`` five-point alignment).
* :class:`FaceNetEmbedder` (:mod:`.facenet`) - FaceNet crops -> L2-normalised
  512-d float32 embeddings; its CASIA-WebFace weights are converted from a
  frozen TensorFlow graph and cached with their SHA-256.
* :func:`weights_sidecar`, :func:`read_weights_file` - the one sidecar name
  and the verified SHA-256 of a weights file, for any model.

See ``docs/recognition.md`` for the contract, provenance, policies and measurements.
"""

from __future__ import annotations

from . import facenet
from .align import Alignment, FaceAligner, load_image
from .facenet import FaceNetEmbedder
from .facenet.weights import ensure_weights, resolve_weights
from .models import (
    ARCFACE_CROP,
    FACENET_CROP,
    CropSpec,
    Embedder,
    available_models,
    get_model,
    register_model,
)
from .weightfile import read_weights_file, weights_sidecar

register_model("facenet", facenet.create)

__all__ = ["Alignment", "FaceAligner", "FaceNetEmbedder", "load_image", "ensure_weights", "resolve_weights",
           "CropSpec", "Embedder", "register_model", "get_model", "available_models", "FACENET_CROP",
           "ARCFACE_CROP", "weights_sidecar", "read_weights_file"]
