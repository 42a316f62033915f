"""Frozen-graph reader and conversion to facenet-pytorch weights; cache and error paths."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mriface import datasets
from mriface._io import sha256_file
from mriface.errors import WeightsError
from mriface.recognition.facenet import weights as W

REF = Path(__file__).parent / "data" / "facenet-reference"


# ------------------------------------------------------------ a tiny protobuf encoder (test side)
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(number: int, payload: "bytes | int", wire: int = 2) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + payload
    return key + _varint(len(payload)) + payload


def _tensor(dtype: int, shape: list[int], *, content: bytes = b"", floats=(), ints=()) -> bytes:
    dims = b"".join(_field(2, _field(1, s, 0)) for s in shape)
    body = _field(1, dtype, 0) + _field(2, dims)
    if content:
        body += _field(4, content)
    if floats:
        body += _field(5, struct.pack(f"<{len(floats)}f", *floats))
    if ints:
        body += _field(7, b"".join(_varint(i) for i in ints))
    return body


def _node(name: str, op: str, inputs=(), attrs=()) -> bytes:
    body = _field(1, name.encode()) + _field(2, op.encode())
    body += b"".join(_field(3, i.encode()) for i in inputs)
    for key, attr in attrs:
        body += _field(5, _field(1, key.encode()) + _field(2, attr))
    return body


def test_reader_decodes_hand_encoded_graph(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    graph = b"".join([
        _field(1, _node("w", "Const", attrs=[("value", _field(8, _tensor(1, [2, 3, 4], content=w.tobytes()))),
                                              ("dtype", _field(6, 1, 0))])),
        _field(1, _node("fill", "Const", attrs=[("value", _field(8, _tensor(1, [3], floats=[0.25])))])),
        _field(1, _node("shape", "Const", attrs=[("value", _field(8, _tensor(3, [2], ints=[1, -1])))])),
        _field(1, _node("conv", "Conv2D", inputs=["input:0", "w"],
                        attrs=[("strides", _field(1, _field(3, b"".join(_varint(i) for i in [1, 2, 2, 1])))),
                               ("padding", _field(2, b"SAME")),
                               ("epsilon", _field(4, struct.pack("<f", 0.001), 5))])),
        _field(4, _field(1, 27, 0)),  # versions: skipped
    ])
    path = tmp_path / "g.pb"
    path.write_bytes(graph)
    nodes = W.read_graph(path)
    assert list(nodes) == ["w", "fill", "shape", "conv"]
    np.testing.assert_array_equal(nodes["w"].attrs["value"], w)
    np.testing.assert_array_equal(nodes["fill"].attrs["value"], np.full(3, 0.25, np.float32))
    np.testing.assert_array_equal(nodes["shape"].attrs["value"], [1, -1])
    conv = nodes["conv"]
    assert conv.op == "Conv2D" and conv.inputs == ("input:0", "w")
    assert conv.attrs["strides"] == [1, 2, 2, 1]
    assert conv.attrs["padding"] == b"SAME"
    assert conv.attrs["epsilon"] == pytest.approx(0.001)


def test_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = _field(1, _node("w", "Const", attrs=[("value", _field(8, _tensor(1, [4], content=bytes(16))))]))
    bad = tmp_path / "cut.pb"
    bad.write_bytes(good[:-5])
    with pytest.raises(WeightsError, match="cut.pb"):
        W.read_graph(bad)
    txt = tmp_path / "notes.pb"
    txt.write_bytes(b"\xff" * 8)
    with pytest.raises(WeightsError, match="notes.pb"):
        W.read_graph(txt)


def _reference_inputs() -> np.ndarray:
    names = json.loads((REF / "expected_casia_webface.json").read_text())["names"]
    x = np.stack([np.asarray(Image.open(REF / f"{n}.png").convert("RGB"), np.float32) for n in names])
    return ((x - 127.5) / 128.0).transpose(0, 3, 1, 2).copy()  # NCHW


@pytest.mark.slow
def test_converted_network_matches_opencv_running_the_frozen_graph():
    cv2 = pytest.importorskip("cv2")
    graph = datasets.fetch(W.GRAPH_KEY)
    model = W.build_network(graph)  # converts the .pb on the fly
    rng = np.random.default_rng(4)
    x = np.concatenate([_reference_inputs()[:2], rng.uniform(-1, 1, (1, 3, 160, 160)).astype(np.float32)])
    net = cv2.dnn.readNetFromTensorflow(str(graph))
    ref = []
    for i in range(len(x)):  # the frozen graph's reshapes were constant-folded for batch 1
        net.setInput(x[i:i + 1])  # OpenCV's importer turns the NHWC graph into NCHW blobs
        ref.append(net.forward("embeddings"))
    ref = np.concatenate(ref)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= 1e-4, rel


@pytest.mark.slow
def test_cache_is_written_with_sha256_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFACE_DATA", str(datasets.data_dir()))  # the cached graph stays visible
    monkeypatch.setenv("MRIFACE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    path = W.ensure_weights(download=False)
    assert path.parent == tmp_path / "home" / "weights"
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["sha256"] == sha256_file(path)
    assert meta["graph_sha256"] == datasets.SAMPLES[W.GRAPH_KEY].sha256
    state = torch.load(path, weights_only=True)
    assert W.state_dict_digest(state) == meta["state_dict_digest"] == W.CASIA_DIGEST
    assert "logits.weight" not in state and state["last_linear.weight"].shape == (512, 1792)
    # folded batch norm: gamma 1, mean 0, var + eps == 1
    assert torch.all(state["conv2d_1a.bn.weight"] == 1)
    assert torch.allclose(state["conv2d_1a.bn.running_var"] + 1e-3, torch.ones(32))
    mtime = path.stat().st_mtime_ns
    assert W.ensure_weights(download=False) == path and path.stat().st_mtime_ns == mtime
    path.write_bytes(path.read_bytes()[:1000])  # corrupt: SHA-256 no longer matches
    W.ensure_weights(download=False)
    assert sha256_file(path) == json.loads(path.with_name(path.name + ".json").read_text())["sha256"]
    assert torch.load(path, weights_only=True).keys() == state.keys()


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFACE_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("MRIFACE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    with pytest.raises(WeightsError, match="mriface weights") as exc:
        W.resolve_weights(download=False)
    assert W.ENV_VAR in str(exc.value)


def test_user_weights_by_argument_and_environment(tmp_path, monkeypatch):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    src = InceptionResnetV1(pretrained=None, classify=True, num_classes=7)  # like the VGGFace2 file
    file = tmp_path / "vggface2.pt"
    torch.save(src.state_dict(), file)
    model = W.build_network(file)
    assert torch.equal(model.last_linear.weight, src.last_linear.weight)
    assert not hasattr(model, "logits")
    monkeypatch.setenv(W.ENV_VAR, str(file))
    assert W.resolve_weights() == file
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="nope.pt"):
        W.resolve_weights()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match="junk.pt"):
        W.build_network(junk)
    partial = tmp_path / "partial.pt"
    torch.save({"last_linear.weight": torch.zeros(512, 1792)}, partial)
    with pytest.raises(WeightsError, match="partial.pt"):
        W.build_network(partial)


def test_old_import_path_names_the_same_objects():
    from mriface.recognition import weights as old
    from mriface.recognition.facenet import graph

    assert old.read_graph is graph.read_graph and old.resolve_weights is W.resolve_weights
    assert old.ENV_VAR == W.ENV_VAR and old.build_network is W.build_network


def test_load_weights_file_hashes_the_bytes_it_loads(tmp_path):
    import hashlib

    state = {"w": torch.arange(6.0)}
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded, sha = W.load_weights_file(path)
    assert torch.equal(loaded["w"], state["w"]) and sha == hashlib.sha256(path.read_bytes()).hexdigest()
