"""ONNX face models in torch: a small ONNX reader and a graph interpreter module, without ``onnx``.

An ONNX file is one serialised ``ModelProto`` protocol buffer. :func:`read_onnx`
decodes the parts an inference graph needs (``GraphProto`` -> ``NodeProto``,
``AttributeProto``, ``TensorProto`` initializers, the graph's inputs and
outputs) with the wire-format primitives of the frozen-TensorFlow reader
(:mod:`mriface.recognition.facenet.graph`): no ``onnx``/``protobuf`` package.
:class:`OnnxModule` runs such a graph as a torch ``nn.Module``: every float
initializer becomes a parameter, nodes run in file order (ONNX requires
topological order), so a model batches on any device, runs in float16 or
bfloat16, and gives gradients with respect to its input.

Only the operators of the models mriface ships are implemented (convolution
networks with batch norm, PReLU, residual adds and a fully connected head:
ArcFace MobileFaceNet ``w600k_mbf`` and SFace). A graph using anything else
is refused with the operator's name rather than run wrongly.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WeightsError
from .facenet.graph import _fields, _packed_varints, _signed64

__all__ = ["OnnxNode", "OnnxGraph", "read_onnx", "parse_onnx", "fold_batchnorm", "OnnxModule", "SUPPORTED_OPS"]

# onnx.TensorProto.DataType values we read
_NP_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 10: np.float16,
              11: np.float64}


@dataclass(frozen=True)
class OnnxNode:
    """One ``NodeProto``.

    Attributes
    ----------
    op : str
        Operator type (``"Conv"``, ``"PRelu"``, ...); the default ONNX domain only.
    inputs, outputs : tuple of str
        Value names (an empty input name means an omitted optional input).
    attrs : dict
        Attribute name -> int, float, bytes, list of int/float, or numpy array.
    name : str
        The node's own name (may be empty).
    """

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class OnnxGraph:
    """The inference-relevant content of an ONNX ``ModelProto``.

    Attributes
    ----------
    nodes : tuple of OnnxNode
        In file (topological) order.
    initializers : dict
        Constant name -> numpy array (the weights).
    inputs : tuple of (str, tuple)
        Real graph inputs (those without an initializer): name and shape,
        with ``-1`` for a symbolic dimension such as the batch.
    outputs : tuple of str
        Graph output names.
    opset : int
        Version of the default-domain operator set.
    producer : str
        ``producer_name`` of the file (e.g. ``"pytorch"``).
    """

    nodes: tuple[OnnxNode, ...]
    initializers: dict
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[str, ...]
    opset: int
    producer: str = ""


def _parse_tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    """``TensorProto`` -> (name, array). Raw or typed storage; external data is refused."""
    dims: list[int] = []
    dtype, name, raw = 0, "", None
    floats: list[np.ndarray] = []  # packed chunks, decoded by numpy (SFace stores 9.7M floats this way)
    ints: list[int] = []
    doubles: list[np.ndarray] = []
    for number, wire, value in _fields(buf):
        if number == 1:  # dims (int64, packed or not)
            dims.extend(_signed64(v) for v in _packed_varints(value))
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:  # raw_data, little-endian
            raw = bytes(value)
        elif number == 4:  # float_data: packed fixed32 (wire 2) or one fixed32 (wire 5)
            floats.append(np.frombuffer(value, "<f4"))
        elif number in (5, 7):  # int32_data / int64_data (varints)
            ints.extend(_signed64(v) for v in _packed_varints(value))
        elif number == 10:  # double_data
            doubles.append(np.frombuffer(value, "<f8"))
        elif number == 14 and value == 1:  # data_location = EXTERNAL
            raise ValueError(f"tensor {name or '?'} keeps its data in an external file")
    np_dtype = _NP_DTYPES.get(dtype)
    if np_dtype is None:
        raise ValueError(f"tensor {name or '?'} has ONNX data type {dtype}, which is not supported")
    count = int(np.prod(dims)) if dims else 1
    if raw is not None:
        arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    elif np_dtype == np.float32:
        arr = np.concatenate(floats).astype(np.float32) if floats else np.zeros(0, np.float32)
    elif np_dtype == np.float64:
        arr = np.concatenate(doubles).astype(np.float64) if doubles else np.zeros(0, np.float64)
    elif np_dtype == np.float16:  # stored as the raw 16 bits in int32_data
        arr = np.asarray(ints, np.uint16).view(np.float16)
    else:
        arr = np.asarray(ints, np_dtype)
    if arr.size != count:
        raise ValueError(f"tensor {name or '?'} has {arr.size} values for shape {dims}")
    return name, arr.reshape(dims)


def _parse_attr(buf: memoryview) -> tuple[str, object]:
    """``AttributeProto`` -> (name, value)."""
    name, value = "", None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, v in _fields(buf):
        if number == 1:
            name = bytes(v).decode()
        elif number == 2:  # f (fixed32)
            value = struct.unpack("<f", bytes(v))[0]
        elif number == 3:  # i
            value = _signed64(v)
        elif number == 4:  # s
            value = bytes(v)
        elif number == 5:  # t
            value = _parse_tensor(v)[1]
        elif number == 7:  # floats
            b = bytes(v)
            floats.extend(struct.unpack(f"<{len(b) // 4}f", b))
        elif number == 8:  # ints
            ints.extend(_signed64(x) for x in _packed_varints(v))
        elif number in (6, 10, 11):  # subgraphs, tensor lists: no operator we run has them
            raise ValueError(f"attribute {name or '?'} holds a subgraph or tensor list")
    if value is None and (floats or ints):
        value = floats if floats else ints
    return name, value


def _parse_value_info(buf: memoryview) -> tuple[str, tuple[int, ...]]:
    """``ValueInfoProto`` -> (name, shape) with -1 for symbolic or unknown dimensions."""
    name, shape = "", []
    for number, _, v in _fields(buf):
        if number == 1:
            name = bytes(v).decode()
        elif number == 2:  # TypeProto
            for n2, _, v2 in _fields(v):
                if n2 != 1:  # tensor_type
                    continue
                for n3, _, v3 in _fields(v2):
                    if n3 != 2:  # shape
                        continue
                    for n4, _, v4 in _fields(v3):
                        if n4 != 1:  # dim
                            continue
                        size = -1
                        for n5, _, v5 in _fields(v4):
                            if n5 == 1:  # dim_value (dim_param leaves -1)
                                size = _signed64(v5)
                        shape.append(size)
    return name, tuple(shape)


def parse_onnx(data: "bytes | memoryview", *, source: str = "<bytes>") -> OnnxGraph:
    """Decode a serialised ONNX ``ModelProto``.

    Parameters
    ----------
    data : bytes
        The file's content.
    source : str
        What to call it in error messages.

    Raises
    ------
    WeightsError
        Not a readable ONNX model, or it uses a non-default operator domain,
        external data or subgraphs.
    """
    buf = memoryview(data)
    nodes: list[OnnxNode] = []
    inits: dict[str, np.ndarray] = {}
    declared: list[tuple[str, tuple[int, ...]]] = []
    outputs: list[str] = []
    opset, producer, graph_seen = 0, "", False
    try:
        for number, wire, value in _fields(buf):
            if number == 2 and wire == 2:
                producer = bytes(value).decode(errors="replace")
            elif number == 8 and wire == 2:  # opset_import: domain = 1, version = 2
                domain, version = "", 0
                for n2, _, v2 in _fields(value):
                    if n2 == 1:
                        domain = bytes(v2).decode()
                    elif n2 == 2:
                        version = v2
                if domain in ("", "ai.onnx"):
                    opset = version
            elif number == 7 and wire == 2:
                graph_seen = True
                for n2, w2, v2 in _fields(value):
                    if n2 == 1:  # node
                        ins, outs, attrs, op, name, domain = [], [], {}, "", "", ""
                        for n3, _, v3 in _fields(v2):
                            if n3 == 1:
                                ins.append(bytes(v3).decode())
                            elif n3 == 2:
                                outs.append(bytes(v3).decode())
                            elif n3 == 3:
                                name = bytes(v3).decode()
                            elif n3 == 4:
                                op = bytes(v3).decode()
                            elif n3 == 5:
                                key, val = _parse_attr(v3)
                                attrs[key] = val
                            elif n3 == 7:
                                domain = bytes(v3).decode()
                        if domain not in ("", "ai.onnx"):
                            raise ValueError(f"node {name or op} is in operator domain {domain!r}")
                        nodes.append(OnnxNode(op, tuple(ins), tuple(outs), attrs, name))
                    elif n2 == 5:  # initializer
                        key, arr = _parse_tensor(v2)
                        inits[key] = arr
                    elif n2 == 11:
                        declared.append(_parse_value_info(v2))
                    elif n2 == 12:
                        outputs.append(_parse_value_info(v2)[0])
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise WeightsError(f"{source} is not a readable ONNX model ({exc})") from exc
    if not graph_seen or not nodes:
        raise WeightsError(f"{source} holds no ONNX graph nodes: not an ONNX model")
    # old exporters list every initializer as a graph input too; only the others are fed
    real_inputs = tuple((n, s) for n, s in declared if n not in inits)
    return OnnxGraph(tuple(nodes), inits, real_inputs, tuple(outputs), int(opset), producer)


def read_onnx(path: "str | os.PathLike[str]") -> OnnxGraph:
    """Read an ONNX file (see :func:`parse_onnx`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read ONNX model {path}: {exc}") from exc
    return parse_onnx(data, source=str(path))


# ----------------------------------------------------------------- interpreter
def _pads(node: OnnxNode, spatial: int) -> "tuple[list[int], bool]":
    """ONNX ``pads`` ([begin..., end...]) -> (F.pad order, symmetric?)."""
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    begin, end = pads[:spatial], pads[spatial:]
    return begin + end, begin == end


def _op_conv(m: "OnnxModule", node: OnnxNode, x, w, b=None):
    auto = node.attrs.get("auto_pad", b"NOTSET")
    if auto not in (b"NOTSET", b""):
        raise WeightsError(f"Conv {node.name}: auto_pad={auto!r} is not supported")
    spatial = w.ndim - 2
    if spatial != 2:
        raise WeightsError(f"Conv {node.name}: only 2-D convolutions are supported")
    pads, symmetric = _pads(node, 2)
    if not symmetric:  # F.pad takes the last dimension first
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        pads = [0, 0, 0, 0]
    return F.conv2d(x, w, b, stride=tuple(node.attrs.get("strides", [1, 1])),
                    padding=tuple(pads[:2]), dilation=tuple(node.attrs.get("dilations", [1, 1])),
                    groups=int(node.attrs.get("group", 1)))


def _op_batchnorm(m: "OnnxModule", node: OnnxNode, x, scale, bias, mean, var):
    if len([o for o in node.outputs if o]) > 1:
        raise WeightsError(f"BatchNormalization {node.name}: training-mode outputs are not supported")
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(node.attrs.get("epsilon", 1e-5)))


def _op_prelu(m: "OnnxModule", node: OnnxNode, x, slope):
    if x.ndim >= 2 and slope.numel() == x.shape[1] and (slope.ndim == 1 or slope.shape[0] == x.shape[1]):
        return F.prelu(x, slope.reshape(-1))  # one slope per channel: torch's own (fused) kernel
    return torch.where(x >= 0, x, x * slope)  # ONNX's general broadcasting form


def _op_gemm(m: "OnnxModule", node: OnnxNode, a, b, c=None):
    if node.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if node.attrs.get("transB", 0) and alpha == 1.0 and (c is None or beta == 1.0):
        return F.linear(a, b, c)
    y = alpha * (a @ (b.transpose(0, 1) if node.attrs.get("transB", 0) else b))
    return y if c is None else y + beta * c


def _op_flatten(m: "OnnxModule", node: OnnxNode, x):
    axis = int(node.attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    lead = 1
    for d in x.shape[:axis]:
        lead *= d
    return x.reshape(lead, -1)


def _op_dropout(m: "OnnxModule", node: OnnxNode, x, *rest):
    return x  # inference: identity (a mask output, if any, is not used by these graphs)


SUPPORTED_OPS = {
    "Conv": _op_conv,
    "BatchNormalization": _op_batchnorm,
    "PRelu": _op_prelu,
    "Relu": lambda m, n, x: F.relu(x),
    "Add": lambda m, n, a, b: a + b,
    "Sub": lambda m, n, a, b: a - b,
    "Mul": lambda m, n, a, b: a * b,
    "Gemm": _op_gemm,
    "Flatten": _op_flatten,
    "Dropout": _op_dropout,
    "Identity": lambda m, n, x: x,
}


def fold_batchnorm(graph: OnnxGraph) -> OnnxGraph:
    """Fold each inference batch norm that follows a convolution into that convolution.

    ``BN(conv(x, W) + b) = conv(x, W * k) + (b - mean) * k + beta`` with
    ``k = gamma / sqrt(var + eps)`` per output channel, computed in float64.
    A pair is folded only when the convolution's output feeds nothing but
    the batch norm, its weights feed nothing but that convolution, and the
    batch norm's four statistics are initializers; anything else is left as
    it is. On the CPU this saves a pass over every activation map (SFace has
    29 batch norms: about a fifth of its time); outputs move by ~1e-6
    relative.

    Returns
    -------
    OnnxGraph
        A new graph (the input is not modified).
    """
    inits = dict(graph.initializers)
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    producer = {node.outputs[0]: i for i, node in enumerate(graph.nodes) if node.outputs}
    nodes: list[OnnxNode | None] = list(graph.nodes)
    n_folded = 0
    for i, bn in enumerate(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.inputs) < 5 or len([o for o in bn.outputs if o]) != 1:
            continue
        j = producer.get(bn.inputs[0])
        if j is None or nodes[j] is None or nodes[j].op != "Conv" or uses.get(bn.inputs[0]) != 1:
            continue
        conv = nodes[j]
        stats = bn.inputs[1:5]
        if not all(n in inits for n in stats) or conv.inputs[1] not in inits or uses.get(conv.inputs[1]) != 1:
            continue
        if len(conv.inputs) > 2 and conv.inputs[2] and (conv.inputs[2] not in inits or uses.get(conv.inputs[2]) != 1):
            continue
        gamma, beta, mean, var = (np.asarray(inits[n], np.float64) for n in stats)
        k = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = np.asarray(inits[conv.inputs[1]], np.float64)
        b = (np.asarray(inits[conv.inputs[2]], np.float64) if len(conv.inputs) > 2 and conv.inputs[2]
             else np.zeros(w.shape[0]))
        wname, bname = conv.inputs[1], f"{bn.outputs[0]}__folded_bias"
        inits[wname] = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        inits[bname] = ((b - mean) * k + beta).astype(np.float32)
        nodes[j] = OnnxNode("Conv", (conv.inputs[0], wname, bname), bn.outputs, conv.attrs, conv.name)
        nodes[i] = None
        n_folded += 1
    if not n_folded:
        return graph
    kept = tuple(n for n in nodes if n is not None)
    used = {name for n in kept for name in n.inputs}
    return OnnxGraph(kept, {k: v for k, v in inits.items() if k in used}, graph.inputs, graph.outputs,
                     graph.opset, graph.producer)


class OnnxModule(torch.nn.Module):
    """An ONNX inference graph as a torch module.

    Parameters
    ----------
    graph : OnnxGraph
        From :func:`read_onnx`. It must have one real input and one output,
        and use only :data:`SUPPORTED_OPS`.
    fold : bool
        Fold batch norms into the convolutions before them
        (:func:`fold_batchnorm`; default True). False keeps the graph's
        parameters exactly as stored.

    Notes
    -----
    Float initializers become parameters named after their ONNX names
    (``.`` replaced by ``_``; ``self.onnx_names`` maps back), so
    ``module.to(device, dtype)`` moves and casts them and an optimiser can
    train them; integer ones stay buffers. :meth:`forward` runs the nodes in
    file order, holding each value only until its last use.

    Raises
    ------
    WeightsError
        A graph that uses an unsupported operator or has several inputs/outputs.
    """

    def __init__(self, graph: OnnxGraph, *, fold: bool = True) -> None:
        super().__init__()
        if fold:
            graph = fold_batchnorm(graph)
        unsupported = sorted({n.op for n in graph.nodes} - set(SUPPORTED_OPS))
        if unsupported:
            raise WeightsError(f"ONNX graph uses operators mriface does not run: {', '.join(unsupported)}")
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise WeightsError(f"ONNX graph has inputs {[n for n, _ in graph.inputs]} and outputs "
                               f"{list(graph.outputs)}: mriface runs graphs with one of each")
        self.input_name, self.input_shape = graph.inputs[0]
        self.output_name = graph.outputs[0]
        self.nodes = graph.nodes
        self.onnx_names: dict[str, str] = {}
        self.params = torch.nn.ParameterDict()
        self._consts: dict[str, str] = {}  # ONNX name -> attribute path: "p:<key>" or "b:<key>"
        for i, (name, arr) in enumerate(graph.initializers.items()):
            key = f"t{i}_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
            self.onnx_names[key] = name
            t = torch.from_numpy(np.array(arr, copy=True))
            if t.is_floating_point():
                self.params[key] = torch.nn.Parameter(t, requires_grad=True)
                self._consts[name] = "p:" + key
            else:
                self.register_buffer(key, t)
                self._consts[name] = "b:" + key
        # free each intermediate after its last use (keeps peak memory at one layer's worth)
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last[name] = i
        self._free_after = [tuple(n for n in set(node.inputs) if last.get(n) == i and n not in self._consts
                                  and n != self.input_name) for i, node in enumerate(self.nodes)]
        self.eval()

    def randomize_(self, seed: int = 0) -> "OnnxModule":
        """Replace every float parameter with seeded random values (timing runs without the weights).

        Each tensor gets normal values with its own mean and standard
        deviation, so activations keep roughly their trained scale; batch-norm
        variances are drawn from [0.5, 1.5] to stay positive. Embeddings of a
        randomized network are meaningless. Returns ``self``.
        """
        variances = {n.inputs[4] for n in self.nodes if n.op == "BatchNormalization" and len(n.inputs) > 4}
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for key, p in self.params.items():
                if self.onnx_names[key] in variances:
                    p.copy_((0.5 + torch.rand(p.shape, generator=gen)).to(p))
                    continue
                mean = float(p.double().mean()) if p.numel() else 0.0
                std = float(p.double().std()) if p.numel() > 1 else 0.0
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std).add_(mean).to(p))
        return self

    def _const(self, name: str) -> torch.Tensor:
        kind, key = self._consts[name].split(":", 1)
        return self.params[key] if kind == "p" else getattr(self, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``x`` (shape as the graph's input, batch dimension free)."""
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for node, free in zip(self.nodes, self._free_after):
            args = [None if not n else (values[n] if n in values else self._const(n)) for n in node.inputs]
            while args and args[-1] is None:  # trailing omitted optional inputs
                args.pop()
            out = SUPPORTED_OPS[node.op](self, node, *args)
            values[node.outputs[0]] = out
            for n in free:
                values.pop(n, None)
        return values[self.output_name]
