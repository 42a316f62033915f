"""The face-model seam: CropSpec, the registry, a plug-in from outside mriface, ArcFace alignment, FaceNet identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mriface import datasets
from mriface.errors import MRIFaceError
from mriface.recognition import (
    ARCFACE_CROP,
    FACENET_CROP,
    Alignment,
    CropSpec,
    Embedder,
    FaceAligner,
    FaceNetEmbedder,
    available_models,
    get_model,
    models,
    register_model,
)
from mriface.recognition.align import _warp_arcface, similarity_transform

TEMPLATE = torch.tensor(models.ARCFACE_TEMPLATE, dtype=torch.float64)


# ------------------------------------------------------------------ a toy model defined here, not in mriface
class ToyEmbedder:
    """Mean colour of four quadrants of a 32-px ArcFace-aligned crop: a 12-d 'embedding'."""

    name = "toy"
    dim = 12
    crop = CropSpec(32, "arcface", "raw255")
    licence = "CC0-1.0"

    def __init__(self, *, device="cpu", weights=None, random_weights=False, gain=1.0):
        self.device = torch.device(device if device != "auto" else "cpu")
        self.gain = gain

    def model_id(self):
        return {"name": self.name, "gain": self.gain, "crop": self.crop.as_dict()}

    def embed(self, crops):
        q = torch.nn.functional.adaptive_avg_pool2d(crops.to(self.device).float(), 2).flatten(1) * self.gain
        return torch.nn.functional.normalize(q, dim=1)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that registering in a test leaves no trace."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    return models._REGISTRY


def test_crop_spec_validates_and_normalises():
    assert FACENET_CROP == CropSpec(160, "box", "fixed_standardization")
    assert ARCFACE_CROP == CropSpec(112, "arcface", "arcface")
    x = torch.tensor([0.0, 127.5, 255.0])
    torch.testing.assert_close(FACENET_CROP.normalise(x), (x - 127.5) / 128)
    torch.testing.assert_close(ARCFACE_CROP.normalise(x), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(CropSpec(112, "arcface", "raw255").normalise(x), x)
    for bad in [(0, "box", "arcface"), (112, "affine", "arcface"), (112, "box", "zscore"), (112.0, "box", "raw255")]:
        with pytest.raises(MRIFaceError):
            CropSpec(*bad)
    assert FACENET_CROP.as_dict() == {"size": 160, "alignment": "box", "normalisation": "fixed_standardization"}


def test_registry_plug_in_from_a_test_file(registry):
    assert "facenet" in available_models()
    register_model("toy", ToyEmbedder)
    assert "toy" in available_models() and available_models() == sorted(available_models())
    model = get_model("toy", device="cpu", gain=2.0)
    assert isinstance(model, Embedder) and model.gain == 2.0 and model.dim == 12
    register_model("toy", ToyEmbedder)  # the same factory again is fine
    with pytest.raises(MRIFaceError, match="already registered"):
        register_model("toy", lambda **kw: ToyEmbedder(**kw))
    register_model("toy", lambda **kw: ToyEmbedder(gain=3.0, **kw), replace=True)
    assert get_model("toy").gain == 3.0
    for bad in ["Toy", "two words", "a,b", ""]:
        with pytest.raises(MRIFaceError, match="name"):
            register_model(bad, ToyEmbedder)
    # a factory that returns something that is not an Embedder is caught at get_model
    register_model("broken", lambda **kw: object())
    with pytest.raises(MRIFaceError, match="lacks"):
        get_model("broken")


def test_unknown_model_lists_the_available_ones(registry):
    register_model("toy", ToyEmbedder)
    with pytest.raises(MRIFaceError, match="unknown face model 'arcfac'") as exc:
        get_model("arcfac")
    assert "facenet" in str(exc.value) and "toy" in str(exc.value)


def test_toy_model_embeds_the_crop_it_asked_for(registry):
    register_model("toy", ToyEmbedder)
    toy = get_model("toy")
    photos = [datasets.fetch(k) for k in ("obama", "biden")]
    a = FaceAligner(device="cpu", crops=(FACENET_CROP, toy.crop)).align(photos)
    c = a.crop_for(toy.crop)
    assert c.shape == (2, 3, 32, 32) and a.crops.shape == (2, 3, 160, 160)
    assert c.min() >= 0 and c.max() <= 255 and c.std() > 10  # raw 0..255 pixels of a face
    e = toy.embed(c)
    assert e.shape == (2, 12)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    with pytest.raises(MRIFaceError, match="no crops for"):
        a.crop_for(CropSpec(64, "box", "raw255"))


# ------------------------------------------------------------------ ArcFace five-point alignment
def _similar(points: torch.Tensor, scale: float, angle_deg: float, shift) -> torch.Tensor:
    t = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    return scale * points @ rot.T + torch.tensor(shift, dtype=torch.float64)


def test_similarity_transform_recovers_a_known_similarity():
    marks = torch.stack([_similar(TEMPLATE, 2.7, 23.0, (310.0, 140.0)),
                         _similar(TEMPLATE, 0.8, -9.0, (12.5, 40.25))])
    m = similarity_transform(marks, TEMPLATE)  # landmarks -> template
    mapped = marks @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    assert (mapped - TEMPLATE).norm(dim=-1).max() < 1e-9
    # least squares: noisy landmarks give the similarity of the linear least-squares problem
    # u = a x - b y + tx, v = b x + a y + ty, solved here independently with numpy
    rng = np.random.default_rng(0)
    noisy = marks[0] + torch.from_numpy(rng.normal(0, 2.0, (5, 2)))
    x, y = noisy[:, 0].numpy(), noisy[:, 1].numpy()
    one, zero = np.ones(5), np.zeros(5)
    design = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    a, b, tx, ty = np.linalg.lstsq(design, TEMPLATE.T.reshape(-1).numpy(), rcond=None)[0]
    m = similarity_transform(noisy[None], TEMPLATE)[0].numpy()
    np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], atol=1e-9)


@pytest.mark.parametrize("size", [112, 224])
def test_arcface_warp_puts_the_landmarks_on_the_template(size):
    # an image whose pixels hold their own coordinates: bilinear sampling of a linear ramp is exact, so the
    # crop's pixel at each template point must read back the landmark it came from (pixel-centre convention)
    h, w = 420, 560
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([xs, ys, torch.zeros_like(xs)])[None].repeat(2, 1, 1, 1)
    marks = torch.stack([_similar(TEMPLATE, 2.2, 17.0, (180.0, 95.0)), _similar(TEMPLATE, 1.3, -31.0, (260.0, 210.0))])
    crop = _warp_arcface(img, marks, size)
    assert crop.shape == (2, 3, size, size)
    tpl = TEMPLATE * size / 112.0
    for b in range(2):
        for (u, v), (x, y) in zip(tpl.tolist(), marks[b].tolist()):
            # sample the crop at the (fractional) template point by bilinear interpolation
            iu, iv = int(math.floor(u)), int(math.floor(v))
            fu, fv = u - iu, v - iv
            patch = crop[b, :2, iv:iv + 2, iu:iu + 2].double()
            val = (patch[:, 0, 0] * (1 - fu) * (1 - fv) + patch[:, 0, 1] * fu * (1 - fv)
                   + patch[:, 1, 0] * (1 - fu) * fv + patch[:, 1, 1] * fu * fv)
            assert abs(val[0] - x) < 0.5 and abs(val[1] - y) < 0.5, (b, u, v, val.tolist(), x, y)


def test_arcface_crops_of_photographs_put_mtcnn_landmarks_near_the_template():
    spec = CropSpec(112, "arcface", "arcface")
    photos = [datasets.fetch(k) for k in ("obama", "obama2", "biden")]
    a = FaceAligner(device="cpu", crops=(FACENET_CROP, spec)).align(photos)
    assert a.found.all() and torch.isfinite(a.landmarks).all()
    m = similarity_transform(a.landmarks.double(), TEMPLATE)
    mapped = a.landmarks.double() @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    assert (mapped - TEMPLATE).norm(dim=-1).max() < 10.0  # real faces are not the template: a few pixels
    boxes = a.boxes
    inside = ((a.landmarks[..., 0] > boxes[:, None, 0]) & (a.landmarks[..., 0] < boxes[:, None, 2])
              & (a.landmarks[..., 1] > boxes[:, None, 1]) & (a.landmarks[..., 1] < boxes[:, None, 3]))
    assert inside.all()
    c = a.crop_for(spec)
    assert c.shape == (3, 3, 112, 112) and c.min() >= -1 - 1e-5 and c.max() <= 1 + 1e-5
    # the eyes of an aligned crop sit where the template puts them: darker than the cheek below
    eye_row, cheek_row = c[:, :, 50:54, 30:46].mean(), c[:, :, 62:66, 30:46].mean()
    assert eye_row < cheek_row


def test_no_face_rows_have_nan_landmarks_and_zero_crops_for_every_spec():
    blank = np.full((200, 240, 3), 128, np.uint8)
    a = FaceAligner(device="cpu", crops=(FACENET_CROP, ARCFACE_CROP)).align([blank])
    assert not a.found[0] and torch.isnan(a.landmarks).all()
    assert torch.all(a.crops == 0) and torch.all(a.crop_for(ARCFACE_CROP) == 0)


def test_hand_built_alignment_still_works_for_facenet():
    crops = torch.zeros(2, 3, 160, 160)
    a = Alignment(crops=crops, found=torch.tensor([True, False]), prob=torch.ones(2), boxes=torch.zeros(2, 4),
                  n_faces=torch.ones(2, dtype=torch.int64))
    assert a.crop_for(FACENET_CROP) is crops and a.landmarks.shape == (2, 5, 2)


# ------------------------------------------------------------------ FaceNet as a plug-in: unchanged
# Recorded with the pre-refactor code (mriface at 45d92b5) on these photographs: boxes, and the cosine
# matrix and first components of the embeddings (obama, obama2, obama3, biden).
_OLD_BOXES = [[367.468, 78.986, 616.357, 428.281], [190.163, 213.315, 472.483, 638.683],
              [634.092, 249.252, 914.142, 612.499], [427.137, 167.043, 713.630, 560.418]]
_OLD_COS = [[1.0, 0.690333, 0.772917, 0.078766], [0.690333, 1.0, 0.757610, 0.148044],
            [0.772917, 0.757610, 1.0, 0.145186], [0.078766, 0.148044, 0.145186, 1.0]]
_OLD_FIRST = [[0.006895, -0.035948, -0.034421, 0.011504], [0.013177, -0.061459, 0.019197, -0.006118],
              [0.038858, -0.073051, -0.041118, -0.000957], [0.039385, -0.007648, -0.024675, -0.041782]]


@pytest.fixture(scope="module")
def facenet():
    return get_model("facenet", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("detect_side", [None, 384])
def test_facenet_plug_in_reproduces_the_old_pipeline(facenet, detect_side):
    photos = [p for ps in datasets.sample_photos().values() for p in ps]
    a = FaceAligner(device="cpu", detect_side=detect_side).align(photos)
    np.testing.assert_allclose(a.boxes.numpy(), _OLD_BOXES, atol=2e-3)
    e = facenet.embed(a).numpy()
    np.testing.assert_allclose(e @ e.T, _OLD_COS, atol=2e-6)
    np.testing.assert_allclose(e[:, :4], _OLD_FIRST, atol=2e-6)


def test_facenet_is_the_default_and_identifies_its_weights(facenet):
    from mriface.recognition.facenet.weights import resolve_weights

    assert isinstance(facenet, FaceNetEmbedder) and isinstance(facenet, Embedder)
    assert models.DEFAULT_MODEL == "facenet" and get_model.__defaults__[0] == "facenet"
    assert facenet.crop == FACENET_CROP and facenet.dim == 512 and facenet.licence == "MIT"
    ident = facenet.model_id()
    import hashlib
    import json

    assert ident["weights_sha256"] == hashlib.sha256(resolve_weights().read_bytes()).hexdigest()
    assert ident["crop"] == FACENET_CROP.as_dict() and json.loads(json.dumps(ident)) == ident


def test_facenet_model_id_is_the_file_loaded_not_its_sidecar(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    from mriface.recognition import weights_sidecar

    torch.manual_seed(1)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), first)
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), second)
    assert weights_sidecar(first) == tmp_path / "a.pt.json"
    # a copied sidecar claims the other file's identity: it must not be believed
    weights_sidecar(second).write_text('{"sha256": "%s"}' % ("0" * 64))
    ida = FaceNetEmbedder(first, device="cpu").model_id()["weights_sha256"]
    idb = FaceNetEmbedder(second, device="cpu").model_id()["weights_sha256"]
    assert ida != idb and "0" * 64 not in (ida, idb)
    r1 = get_model("facenet", device="cpu", random_weights=True).model_id()
    r2 = get_model("facenet", device="cpu", random_weights=True)
    assert r1 == r2.model_id() and r1["weights"] == "random"


def test_random_weights_are_reproducible_and_leave_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = FaceNetEmbedder(device="cpu", random_weights=True)
    assert torch.equal(torch.get_rng_state(), before)
    b = FaceNetEmbedder(device="cpu", random_weights=True)
    assert torch.equal(a.model.last_linear.weight, b.model.last_linear.weight)


