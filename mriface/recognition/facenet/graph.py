"""A reader for frozen TensorFlow graphs (``GraphDef`` protocol buffers), without TensorFlow.

It decodes the protocol-buffer wire format directly (no ``protobuf``
package): ``GraphDef`` -> ``NodeDef`` -> ``AttrValue`` -> ``TensorProto``,
enough to read the constants of a frozen graph such as FaceNet's
``graph_final.pb`` (see :mod:`mriface.recognition.facenet.weights`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import WeightsError

__all__ = ["GraphNode", "read_graph"]

# TensorFlow DataType enum values we read (tensorflow/core/framework/types.proto)
_DT_FLOAT, _DT_INT32, _DT_INT64 = 1, 3, 9


# ----------------------------------------------------------------- protobuf wire format
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``buf[i]``; return (value, next index)."""
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _fields(buf: memoryview) -> Iterator[tuple[int, int, "int | memoryview"]]:
    """Iterate (field number, wire type, value) over one serialised message.

    Varints come back as int, length-delimited and fixed-width fields as
    memoryview slices (no copy).
    """
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:  # groups (3, 4) are not used by GraphDef
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _packed_varints(value: "int | memoryview") -> list[int]:
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_tensor(buf: memoryview) -> np.ndarray:
    """TensorProto -> numpy array (float32 / int32 / int64 only)."""
    dtype, shape, content = 0, [], None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, value in _fields(buf):
        if number == 1:  # dtype
            dtype = value
        elif number == 2:  # tensor_shape: TensorShapeProto
            for n2, _, v2 in _fields(value):
                if n2 == 2:  # dim { size = 1 }
                    size = 0
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            size = _signed64(v3)
                    shape.append(size)
        elif number == 4:  # tensor_content: raw little-endian bytes
            content = bytes(value)
        elif number == 5:  # float_val, packed (wire 2) or one at a time (wire 5)
            raw = bytes(value)
            floats.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
        elif number in (7, 10):  # int_val / int64_val
            ints.extend(_signed64(v) for v in _packed_varints(value))
    np_dtype = {_DT_FLOAT: np.float32, _DT_INT32: np.int32, _DT_INT64: np.int64}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"tensor dtype {dtype} is not supported")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    else:
        vals = floats if np_dtype == np.float32 else ints
        # protobuf stores a constant-filled tensor as one value
        arr = np.full(count, vals[0] if vals else 0, dtype=np_dtype) if len(vals) <= 1 else np.asarray(vals, np_dtype)
    if arr.size != count:
        raise ValueError(f"tensor has {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def _parse_attr(buf: memoryview) -> object:
    """AttrValue -> python value for the kinds the FaceNet graph uses."""
    for number, wire, value in _fields(buf):
        if number == 2:  # s
            return bytes(value)
        if number == 3:  # i
            return _signed64(value)
        if number == 4:  # f
            return struct.unpack("<f", bytes(value))[0]
        if number == 5:  # b
            return bool(value)
        if number == 6:  # type
            return int(value)
        if number == 8:  # tensor
            return _parse_tensor(value)
        if number == 1:  # list: only ints (strides, ksize) matter here
            ints: list[int] = []
            for n2, _, v2 in _fields(value):
                if n2 == 3:
                    ints.extend(_signed64(v) for v in _packed_varints(v2))
            return ints
    return None


@dataclass(frozen=True)
class GraphNode:
    """One NodeDef of a frozen TensorFlow graph.

    Attributes
    ----------
    name, op : str
        Node name and operation type (``"Const"``, ``"Conv2D"``, ...).
    inputs : tuple of str
        Input node names (``":0"`` output suffixes kept as written).
    attrs : dict
        Parsed attributes; a ``Const`` node's tensor is ``attrs["value"]``
        (numpy array).
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)


def read_graph(path: "str | os.PathLike[str]", data: "bytes | None" = None) -> dict[str, GraphNode]:
    """Read a frozen TensorFlow ``GraphDef`` file.

    Parameters
    ----------
    path : path-like
        A binary ``.pb`` file holding one serialised ``tensorflow.GraphDef``.
    data : bytes, optional
        The file's bytes when the caller has read them already (they are
        then parsed instead of reading ``path``, which names them in errors).

    Returns
    -------
    dict
        Node name -> :class:`GraphNode`, in file order.

    Raises
    ------
    WeightsError
        If the file cannot be read or is not a GraphDef.
    """
    path = Path(path)
    try:
        buf = memoryview(path.read_bytes() if data is None else data)
    except OSError as exc:
        raise WeightsError(f"cannot read TensorFlow graph {path}: {exc}") from exc
    nodes: dict[str, GraphNode] = {}
    try:
        for number, wire, value in _fields(buf):
            if number != 1 or wire != 2:  # 1 = node; versions/library are not needed
                continue
            name, op, inputs, attrs = "", "", [], {}
            for n2, w2, v2 in _fields(value):
                if n2 == 1:
                    name = bytes(v2).decode()
                elif n2 == 2:
                    op = bytes(v2).decode()
                elif n2 == 3:
                    inputs.append(bytes(v2).decode())
                elif n2 == 5:  # map<string, AttrValue> entry: key = 1, value = 2
                    key, attr = "", None
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            key = bytes(v3).decode()
                        elif n3 == 2:
                            attr = _parse_attr(v3)
                    attrs[key] = attr
            nodes[name] = GraphNode(name, op, tuple(inputs), attrs)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise WeightsError(f"{path} is not a readable frozen TensorFlow graph ({exc})") from exc
    if not nodes:
        raise WeightsError(f"{path} holds no graph nodes: not a frozen TensorFlow graph")
    return nodes

