"""FaceNetEmbedder: the published reference distances, photographs of two people, precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mriface import datasets
from mriface.errors import MRIFaceError
from mriface.recognition import Alignment, FaceAligner, FaceNetEmbedder

REF = Path(__file__).parent / "data" / "facenet-reference"


@pytest.fixture(scope="module")
def embedder():
    return FaceNetEmbedder(device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def reference():
    meta = json.loads((REF / "expected_casia_webface.json").read_text())
    x = np.stack([np.asarray(Image.open(REF / f"{n}.png").convert("RGB"), np.float32) for n in meta["names"]])
    crops = torch.from_numpy(((x - 127.5) / 128.0).transpose(0, 3, 1, 2).copy())
    return crops, np.asarray(meta["distances"])


def test_reference_distances_within_1e4(embedder, reference):
    crops, expected = reference
    e = embedder.embed(crops)
    assert e.shape == (5, 512) and e.dtype == torch.float32 and e.device.type == "cpu"
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    d = torch.cdist(e.double(), e.double()).numpy()
    assert np.abs(d - expected).max() <= 1e-4


def test_batch_size_does_not_change_embeddings(embedder, reference):
    crops, _ = reference
    small = FaceNetEmbedder.from_model(embedder.model, device="cpu", batch_size=2)  # same network
    torch.testing.assert_close(small.embed(crops), embedder.embed(crops), atol=1e-5, rtol=0)


def test_alignment_rows_without_face_are_nan(embedder, reference):
    crops, _ = reference
    a = Alignment(crops=crops[:3], found=torch.tensor([True, False, True]), prob=torch.tensor([1.0, np.nan, 1.0]),
                  boxes=torch.zeros(3, 4), n_faces=torch.tensor([1, 0, 1]))
    e = embedder.embed(a)
    assert torch.isnan(e[1]).all() and torch.isfinite(e[[0, 2]]).all()
    torch.testing.assert_close(e[[0, 2]], embedder.embed(crops[[0, 2]]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_obama_photos_closer_to_each_other_than_to_biden(embedder):
    keys = ["obama", "obama2", "obama3", "biden"]
    a = FaceAligner(device="cpu").align([datasets.fetch(k) for k in keys])
    assert a.found.all()
    e = embedder.embed(a)
    d = torch.cdist(e, e)
    same = d[:3, :3][~torch.eye(3, dtype=torch.bool)]
    assert same.max() < d[:3, 3].min(), d


@pytest.mark.slow
def test_bfloat16_on_cpu_agrees_with_float32(embedder, reference):
    crops, _ = reference
    bf = FaceNetEmbedder(device="cpu", dtype=torch.bfloat16)
    e32, e16 = embedder.embed(crops), bf.embed(crops)
    assert e16.dtype == torch.float32
    cos = (e32 * e16).sum(1)
    assert cos.min() > 0.99, cos
    # identities stay apart: the nearest other face is the same in both precisions
    d32, d16 = torch.cdist(e32, e32) + 10 * torch.eye(5), torch.cdist(e16, e16) + 10 * torch.eye(5)
    assert torch.equal(d32.argmin(1), d16.argmin(1))


_TRUNK = ["conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
          "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a"]


def _trunk(model, x):
    """The 1792-d pooled features (before the bottleneck): informative even with random weights."""
    for name in _TRUNK:
        x = getattr(model, name)(x)
    return x.flatten(1).float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_embedder_agrees_with_cpu(reference, dtype):
    # random weights: the GPU host has no weights file; real-weight agreement is the CPU bfloat16 test
    from mriface.recognition.facenet.weights import build_network

    crops, _ = reference
    torch.manual_seed(0)
    model = build_network(random=True)
    gpu = FaceNetEmbedder.from_model(model, device="cuda", dtype=dtype)
    e = gpu.embed(crops)
    assert e.dtype == torch.float32 and e.device.type == "cpu" and e.shape == (5, 512)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = _trunk(model, crops)
        with gpu.precision():  # float32 means IEEE float32 (no TF32), as in embed()
            got = _trunk(gpu.model, crops.to("cuda", dtype)).cpu()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        # a random network's features share a large common part: compare what differs between faces
        ref, got = ref - ref.mean(0), got - got.mean(0)
        rel = ((got - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        assert rel < 1e-3, rel
    else:  # reduced precision loses a random network's small differences: a coarse check only
        rel = ((got - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        assert rel < 5e-2, rel


def test_bad_arguments_are_user_errors(embedder):
    with pytest.raises(MRIFaceError, match="dtype"):
        FaceNetEmbedder(device="cpu", dtype=torch.int8)
    with pytest.raises(MRIFaceError, match="crops"):
        embedder.embed(torch.zeros(2, 160, 160))


def test_precision_context_is_a_no_op_on_cpu_and_leaves_global_flags_alone(embedder):
    before = torch.backends.cudnn.allow_tf32
    with embedder.precision():
        assert torch.backends.cudnn.allow_tf32 == before  # CPU float32: nothing to change
    assert torch.backends.cudnn.allow_tf32 == before
