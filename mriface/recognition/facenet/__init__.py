"""FaceNet (Sandberg's Inception-ResNet-v1 on CASIA-WebFace) as a face-model plug-in.

* :mod:`.graph` - a frozen TensorFlow graph reader (protocol buffers, no TensorFlow);
* :mod:`.weights` - the graph -> facenet-pytorch conversion, its cache and weights resolution;
* :mod:`.embedder` - :class:`FaceNetEmbedder`, registered as ``"facenet"`` (the default model).
"""

from __future__ import annotations

from .embedder import FaceNetEmbedder, create

__all__ = ["FaceNetEmbedder", "create"]
