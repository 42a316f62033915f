"""Former home of the FaceNet weights code, kept so that existing imports keep working.

The code now lives in :mod:`mriface.recognition.facenet.weights` (conversion,
cache, resolution) and :mod:`mriface.recognition.facenet.graph` (the frozen
graph reader); the sidecar name and verified weights identity shared by every
model are in :mod:`mriface.recognition.weightfile`. New code should import
from there; the names below are the same objects.
"""

from __future__ import annotations

from .facenet.graph import GraphNode, read_graph
from .facenet.weights import (
    CACHED_NAME,
    CASIA_DIGEST,
    CONVERSION_VERSION,
    ENV_VAR,
    GRAPH_KEY,
    build_network,
    cached_weights_path,
    convert_graph,
    ensure_weights,
    load_network,
    load_state_dict,
    load_weights_file,
    resolve_weights,
    state_dict_digest,
)
from .weightfile import read_weights_file, weights_sidecar

__all__ = [
    "ENV_VAR", "GRAPH_KEY", "CACHED_NAME", "CASIA_DIGEST", "CONVERSION_VERSION", "GraphNode", "read_graph",
    "convert_graph", "state_dict_digest", "cached_weights_path", "ensure_weights", "resolve_weights",
    "load_state_dict", "load_weights_file", "load_network", "build_network", "weights_sidecar",
    "read_weights_file",
]
