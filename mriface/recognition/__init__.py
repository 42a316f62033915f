"""Face recognition: MTCNN alignment and FaceNet embeddings, offline.

* :class:`FaceAligner` - images (photographs or renders) -> :class:`Alignment`
  (160x160 standardised crops, detection probability, box, face count).
* :class:`FaceNetEmbedder` - crops -> L2-normalised 512-d float32 embeddings.
* :mod:`mriface.recognition.weights` - the CASIA-WebFace weights converted
  from a frozen TensorFlow graph, cached with their SHA-256.

See ``docs/recognition.md`` for provenance, policies and measurements.
"""

from __future__ import annotations

from .align import Alignment, FaceAligner, load_image
from .embed import FaceNetEmbedder
from .weights import ensure_weights, resolve_weights

__all__ = ["Alignment", "FaceAligner", "FaceNetEmbedder", "load_image", "ensure_weights", "resolve_weights"]
